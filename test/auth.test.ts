// Authentication, roles and API tokens, through SQL and over real HTTP.
import jwt from "jsonwebtoken";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import {
  actorOf, asActor, asOwner, createUser, db, graphql, http, owner, sqlState, startTestServer, tokenFor,
  TEST_PASSWORD, type TestUser,
} from "./helpers.ts";

let server: RunningServer;
let admin: TestUser, editor: TestUser, viewer: TestUser;

beforeAll(async () => {
  server = await startTestServer();
  [admin, editor, viewer] = await Promise.all([createUser("admin"), createUser("editor"), createUser("viewer")]);
});
afterAll(async () => {
  await server?.close();
});

describe("POST /api/v1/auth/login", () => {
  it("returns a JWT for the right password, naming the user and role", async () => {
    const res = await http(server.url, "POST", "/api/v1/auth/login", { body: { email: editor.email.toUpperCase(), password: TEST_PASSWORD } });
    expect(res.status).toBe(200);
    const claims = jwt.verify(res.body.token, db.jwtSecret, { audience: "snapbase" }) as jwt.JwtPayload;
    expect(claims).toMatchObject({ user_id: Number(editor.id), email: editor.email, role: "editor" });
    expect(claims.exp! - claims.iat!).toBe(3600);
  });

  it("refuses a wrong password and an unknown user alike, with 401", async () => {
    const wrong = await http(server.url, "POST", "/api/v1/auth/login", { body: { email: editor.email, password: "wrong password" } });
    const unknown = await http(server.url, "POST", "/api/v1/auth/login", { body: { email: "nobody@example.com", password: TEST_PASSWORD } });
    for (const res of [wrong, unknown]) {
      expect(res.status).toBe(401);
      expect(res.body).toEqual({ error: { code: "28P01", message: "invalid email or password" } });
    }
  });

  it("answers a malformed body with 400 and a clear message", async () => {
    const missing = await http(server.url, "POST", "/api/v1/auth/login", { body: { email: editor.email } });
    expect(missing.status).toBe(400);
    expect(missing.body.error.message).toMatch(/email.*password/);
    const notJson = await http(server.url, "POST", "/api/v1/auth/login", { rawBody: "{not json" });
    expect(notJson.status).toBe(400);
    expect(notJson.body.error).toEqual({ code: "invalid_json", message: "the request body is not valid JSON" });
    expect(JSON.stringify(notJson.body)).not.toMatch(/at .*\.ts/);
  });
});

describe("bearer tokens on GraphQL", () => {
  const whoAmI = "{ currentAppRole currentUser { email role } }";

  it("treats a request without a token as anonymous", async () => {
    const res = await graphql(server.url, whoAmI);
    expect(res.body.data).toEqual({ currentAppRole: "anonymous", currentUser: null });
  });

  it("runs as the token's user and role", async () => {
    const res = await graphql(server.url, whoAmI, {}, await tokenFor(editor));
    expect(res.body.data).toEqual({ currentAppRole: "editor", currentUser: { email: editor.email, role: "editor" } });
  });

  it("rejects an expired token with 401 token_expired", async () => {
    const expired = jwt.sign({ aud: "snapbase", user_id: Number(admin.id), role: "admin", exp: Math.floor(Date.now() / 1000) - 10 }, db.jwtSecret);
    const res = await graphql(server.url, whoAmI, {}, expired);
    expect(res.status).toBe(401);
    expect(res.body.errors?.[0]?.extensions?.code).toBe("token_expired");
  });

  it("rejects a token signed with another secret", async () => {
    const forged = jwt.sign({ aud: "snapbase", user_id: Number(admin.id), role: "admin" }, "another-secret-another-secret-another");
    const res = await graphql(server.url, whoAmI, {}, forged);
    expect(res.status).toBe(401);
    expect(res.body.errors?.[0]?.extensions?.code).toBe("invalid_token");
  });

  it("rejects a header that is not a bearer token", async () => {
    const res = await fetch(server.url + "/graphql", {
      method: "POST",
      headers: { authorization: "Basic abc", "content-type": "application/json" },
      body: JSON.stringify({ query: whoAmI }),
    });
    expect(res.status).toBe(401);
  });
});

describe("roles and row-level security", () => {
  it("a viewer cannot write users directly", async () => {
    const err = await asActor(actorOf(viewer), (c) => sqlState(() => c.query("insert into snapbase.users (email) values ('x@example.com')")));
    expect(err.code).toBe("42501");
  });

  it("an editor cannot act as admin", async () => {
    const err = await asActor(actorOf(editor), (c) => sqlState(() => c.query("select snapbase.create_user('new@example.com', 'long enough', 'viewer')")));
    expect(err).toEqual({ code: "42501", message: "this action requires the admin role (you are editor)" });
    const audit = await asActor(actorOf(editor), (c) => sqlState(() => c.query("select * from snapbase.audit_log")));
    expect(audit.code).toBe("42501");
  });

  it("users see only themselves; admins see everyone", async () => {
    const mine = await asActor(actorOf(viewer), (c) => c.query("select email from snapbase.users"));
    expect(mine.rows).toEqual([{ email: viewer.email }]);
    const all = await asActor(actorOf(admin), (c) => c.query("select count(*)::int as n from snapbase.users"));
    expect(all.rows[0].n).toBeGreaterThanOrEqual(3);
  });

  it("a DBA (the owner, no claims) acts as admin and is named in the audit log", async () => {
    await asOwner(async (c) => {
      await c.query("select snapbase.create_user('dba-made@example.com', 'long enough', 'viewer')");
      const { rows } = await c.query("select actor, action from snapbase.audit_log where details->>'email' = 'dba-made@example.com'");
      expect(rows).toEqual([{ actor: db.roles.owner, action: "create_user" }]);
    });
  });

  it("refuses bad input to create_user without leaving a user behind", async () => {
    const short = await asActor(actorOf(admin), (c) => sqlState(() => c.query("select snapbase.create_user('a@example.com', 'short', 'viewer')")));
    expect(short.message).toBe("password must be at least 8 characters");
    const dup = await asActor(actorOf(admin), (c) => sqlState(() => c.query("select snapbase.create_user($1, 'long enough', 'viewer')", [viewer.email.toUpperCase()])));
    expect(dup.code).toBe("23505");
    const { rows } = await owner().query("select count(*)::int as n from snapbase.users where email = 'a@example.com'");
    expect(rows[0].n).toBe(0);
  });

  it("the audit log cannot be changed, even by an admin or the owner", async () => {
    await owner().query("select snapbase_private.audit('test_entry')");
    const asAdmin = await asActor(actorOf(admin), (c) => sqlState(() => c.query("delete from snapbase.audit_log")));
    expect(asAdmin.code).toBe("42501");
    const asDba = await asOwner((c) => sqlState(() => c.query("update snapbase.audit_log set action = 'x'")));
    expect(asDba.message).toMatch(/append-only/);
    const truncate = await asOwner((c) => sqlState(() => c.query("truncate snapbase.audit_log")));
    expect(truncate.message).toMatch(/append-only/);
  });
});

describe("API tokens", () => {
  const createToken = `mutation($name: String!, $scopes: [String]!) { createApiToken(input: { name: $name, scopes: $scopes }) { result } }`;
  const createUserMutation = `mutation($email: String!) { createUser(input: { email: $email, password: "long enough", role: viewer }) { result { email } } }`;

  async function makeToken(user: TestUser, scopes: string[]): Promise<string> {
    const res = await graphql(server.url, createToken, { name: `t-${scopes.join("-")}`, scopes }, await tokenFor(user));
    expect(res.body.errors).toBeUndefined();
    return res.body.data.createApiToken.result;
  }

  it("is shown once and stored only as a hash", async () => {
    const token = await makeToken(viewer, ["read"]);
    expect(token).toMatch(/^sbt_[A-Za-z0-9_-]{43}$/);
    const { rows } = await owner().query("select count(*)::int as n from snapbase_private.api_token_hashes where token_hash = digest($1, 'sha256')", [token]);
    expect(rows[0].n).toBe(1);
    const leaked = await owner().query("select count(*)::int as n from snapbase.api_tokens t where t::text like '%' || $1 || '%'", [token]);
    expect(leaked.rows[0].n).toBe(0);
  });

  it("a read-scoped token of an admin acts as a viewer", async () => {
    const token = await makeToken(admin, ["read"]);
    const who = await graphql(server.url, "{ currentAppRole currentUser { email } }", {}, token);
    expect(who.body.data).toEqual({ currentAppRole: "viewer", currentUser: { email: admin.email } });
    const denied = await graphql(server.url, createUserMutation, { email: "by-read-token@example.com" }, token);
    expect(denied.body.errors?.[0]?.extensions?.code).toBe("42501");
  });

  it("an admin-scoped token can do admin work", async () => {
    const token = await makeToken(admin, ["admin"]);
    const email = `by-admin-token-${Date.now()}@example.com`;
    const res = await graphql(server.url, createUserMutation, { email }, token);
    expect(res.body.data.createUser.result.email).toBe(email);
  });

  it("cannot exceed its user's role", async () => {
    const res = await graphql(server.url, createToken, { name: "too much", scopes: ["write"] }, await tokenFor(viewer));
    expect(res.body.errors?.[0]).toMatchObject({ message: "the write scope needs an editor or admin user", extensions: { code: "42501" } });
    const bad = await graphql(server.url, createToken, { name: "bad", scopes: ["root"] }, await tokenFor(viewer));
    expect(bad.body.errors?.[0]?.message).toMatch(/scopes must be a non-empty subset/);
  });

  it("stops working once revoked", async () => {
    const token = await makeToken(editor, ["write"]);
    expect((await graphql(server.url, "{ currentAppRole }", {}, token)).body.data.currentAppRole).toBe("editor");
    const { rows } = await owner().query("select token_id from snapbase_private.api_token_hashes where token_hash = digest($1, 'sha256')", [token]);
    const revoke = await graphql(server.url, `mutation($id: BigInt!) { revokeApiToken(input: { tokenId: $id }) { result { revokedAt } } }`,
      { id: String(rows[0].token_id) }, await tokenFor(editor));
    expect(revoke.body.data.revokeApiToken.result.revokedAt).toBeTruthy();
    const after = await graphql(server.url, "{ currentAppRole }", {}, token);
    expect(after.status).toBe(401);
    expect(after.body.errors?.[0]?.extensions?.code).toBe("invalid_token");
  });
});
