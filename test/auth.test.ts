// Authentication, roles and API tokens, through SQL and over real HTTP.
import jwt from "jsonwebtoken";
import pg from "pg";
import { databaseName, withUrlParts } from "../src/db/urls.ts";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server/app.ts";
import {
  actorOf, asActor, asOwner, createUser, db, graphql, http, owner, sqlState, startTestServer, tokenFor,
  TEST_PASSWORD, type TestUser,
} from "./helpers.ts";

let server: RunningServer;
let admin: TestUser, editor: TestUser, viewer: TestUser;

beforeAll(async () => {
  // Trusts X-Forwarded-For from loopback, so tests can sign in "from" several addresses.
  server = await startTestServer({ http: { trustProxy: "loopback" } });
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

const login = (email: string, password: string, from = "198.51.100.1") =>
  http(server.url, "POST", "/api/v1/auth/login", { body: { email, password }, headers: { "x-forwarded-for": from } });
const whoAmI = "{ currentAppRole currentUser { email role } }";
const createUserMutation = `mutation($email: String!) { createUser(input: { email: $email, password: "long enough", role: admin }) { result { email } } }`;

describe("sessions: every request acts with the user's current role and status", () => {
  it("a demoted admin's JWT acts as a viewer at once and can no longer create admins", async () => {
    const demoted = await createUser("admin", "demoted");
    const token = await tokenFor(demoted);
    expect((await graphql(server.url, whoAmI, {}, token)).body.data.currentAppRole).toBe("admin");
    await owner().query("update snapbase.users set role = 'viewer' where id = $1", [demoted.id]);
    expect((await graphql(server.url, whoAmI, {}, token)).body.data).toEqual({ currentAppRole: "viewer", currentUser: { email: demoted.email, role: "viewer" } });
    const denied = await graphql(server.url, createUserMutation, { email: `made-by-demoted-${Date.now()}@example.com` }, token);
    expect(denied.body.errors?.[0]?.extensions?.code).toBe("42501");
  });

  it("an admin changes a role with set_user_role, audited", async () => {
    const target = await createUser("editor", "promoted");
    const res = await graphql(server.url, `mutation($id: BigInt!) { setUserRole(input: { userId: $id, role: viewer }) { result { role } } }`, { id: target.id }, await tokenFor(admin));
    expect(res.body.data.setUserRole.result.role).toBe("viewer");
    const { rows } = await owner().query("select details from snapbase.audit_log where action = 'set_user_role' and subject_id = $1", [target.id]);
    expect(rows[0].details).toMatchObject({ from: "editor", to: "viewer" });
  });

  it("sign-out ends the session at once; other sessions go on", async () => {
    const u = await createUser("editor", "signout");
    const [a, b] = [(await login(u.email, TEST_PASSWORD)).body.token, (await login(u.email, TEST_PASSWORD)).body.token];
    const out = await graphql(server.url, "mutation { signOut(input: {}) { result } }", {}, a);
    expect(out.body.data.signOut.result).toBe(true);
    const after = await graphql(server.url, whoAmI, {}, a);
    expect(after.status).toBe(401);
    expect(after.body.errors?.[0]?.extensions?.code).toBe("session_ended");
    const rest = await http(server.url, "GET", "/api/v1/changes", { token: a });
    expect(rest.status).toBe(401);
    expect(rest.body.error.code).toBe("session_ended");
    expect((await graphql(server.url, whoAmI, {}, b)).body.data.currentAppRole).toBe("editor");
  });

  it("revoke all my sessions ends every session of the user, stream tokens included", async () => {
    const u = await createUser("viewer", "revokeall");
    const a = (await login(u.email, TEST_PASSWORD)).body.token;
    const b = await tokenFor(u);
    const stream = (await graphql(server.url, "{ createStreamToken }", {}, b)).body.data.createStreamToken;
    const res = await graphql(server.url, "mutation { revokeAllSessions(input: {}) { result } }", {}, a);
    expect(res.body.data.revokeAllSessions.result).toBe(2);
    for (const token of [a, b]) expect((await graphql(server.url, whoAmI, {}, token)).status).toBe(401);
    expect((await fetch(`${server.url}/api/v1/changes/events?access_token=${stream}`)).status).toBe(401);
  });

  it("a disabled user is refused at once: JWTs, API tokens and sign-in", async () => {
    const u = await createUser("editor", "disabled");
    const token = await tokenFor(u);
    const apiToken = (await graphql(server.url, `mutation { createApiToken(input: { name: "t", scopes: ["read"] }) { result } }`, {}, token)).body.data.createApiToken.result;
    const res = await graphql(server.url, `mutation($id: BigInt!) { setUserDisabled(input: { userId: $id, disabled: true }) { result { disabledAt } } }`, { id: u.id }, await tokenFor(admin));
    expect(res.body.data.setUserDisabled.result.disabledAt).toBeTruthy();
    for (const t of [token, apiToken]) {
      const r = await graphql(server.url, whoAmI, {}, t);
      expect(r.status).toBe(401);
    }
    const again = await login(u.email, TEST_PASSWORD);
    expect(again.status).toBe(401);
    expect(again.body.error).toEqual({ code: "28000", message: "this account is disabled" });
  });

  it("a deleted user is refused at once", async () => {
    const u = await createUser("admin", "deleted");
    const token = await tokenFor(u);
    await owner().query("delete from snapbase.users where id = $1", [u.id]);
    const res = await graphql(server.url, whoAmI, {}, token);
    expect(res.status).toBe(401);
    expect(res.body.errors?.[0]?.extensions?.code).toBe("session_ended");
  });
});

describe("stream tokens", () => {
  it("are good for SSE reading only: refused as a Bearer token on GraphQL and REST", async () => {
    const token = await tokenFor(editor);
    const stream = (await graphql(server.url, "{ createStreamToken }", {}, token)).body.data.createStreamToken;
    const mint = await graphql(server.url, `mutation { createApiToken(input: { name: "from stream", scopes: ["write"] }) { result } }`, {}, stream);
    expect(mint.status).toBe(401);
    expect(mint.body.errors?.[0]).toMatchObject({ extensions: { code: "stream_token_not_allowed" } });
    expect(mint.body.errors?.[0]?.message).toMatch(/event streams/);
    const rest = await http(server.url, "GET", "/api/v1/changes", { token: stream });
    expect(rest.status).toBe(401);
    expect(rest.body.error.code).toBe("stream_token_not_allowed");
    const sse = new AbortController();
    const ok = await fetch(`${server.url}/api/v1/changes/events?access_token=${stream}`, { signal: sse.signal });
    expect(ok.status).toBe(200);
    sse.abort();
    const bearerSse = new AbortController();
    const ok2 = await fetch(`${server.url}/api/v1/changes/events`, { headers: { authorization: `Bearer ${stream}` }, signal: bearerSse.signal });
    expect(ok2.status).toBe(200);
    bearerSse.abort();
  });
});

describe("open event streams", () => {
  it("end at the next event once their session is revoked", async () => {
    const u = await createUser("viewer", "streaming");
    const token = await tokenFor(u);
    const stream = (await graphql(server.url, "{ createStreamToken }", {}, token)).body.data.createStreamToken;
    const res = await fetch(`${server.url}/api/v1/changes/events?access_token=${stream}`);
    expect(res.status).toBe(200);
    const reader = res.body!.getReader();
    await reader.read(); // "retry: …"
    await graphql(server.url, "mutation { revokeAllSessions(input: {}) { result } }", {}, token);
    await owner().query("select snapbase_private.emit('changes', 'test_event', '{}')");
    const ended = await Promise.race([
      (async () => {
        for (;;) if ((await reader.read()).done) return true;
      })(),
      new Promise((resolve) => setTimeout(() => resolve(false), 30_000)),
    ]);
    expect(ended).toBe(true);
  });
});

describe("sign-in throttling", () => {
  it("locks an account after 5 failures: 429 with Retry-After, even for the right password, and audits the lockout", async () => {
    const u = await createUser("viewer", "throttled");
    for (let i = 0; i < 5; i++) expect((await login(u.email, "wrong password", `198.51.100.${10 + i}`)).status).toBe(401);
    const locked = await login(u.email, TEST_PASSWORD, "198.51.100.20");
    expect(locked.status).toBe(429);
    expect(Number(locked.headers.get("retry-after"))).toBeGreaterThan(0);
    expect(locked.body.error.code).toBe("too_many_attempts");
    const { rows } = await owner().query("select details from snapbase.audit_log where action = 'sign_in_locked' and details->>'email' = $1", [u.email]);
    expect(rows).toHaveLength(1);
    expect(rows[0].details).toMatchObject({ scope: "account", failures: 5 });
    // Another account is not affected.
    expect((await login(viewer.email, TEST_PASSWORD, "198.51.100.21")).status).toBe(200);
  });

  it("checks no more passwords than the limit when wrong ones arrive at once, per account and per address", async () => {
    const u = await createUser("viewer", "raced");
    const attempt = async (email: string, address: string) => {
      const c = new pg.Client({ connectionString: db.authenticatorUrl });
      await c.connect();
      try {
        return (await c.query("select (snapbase_private.attempt_login($1, 'wrong password', $2::inet)).outcome", [email, address])).rows[0].outcome as string;
      } finally {
        await c.end();
      }
    };
    const byAccount = await Promise.all(Array.from({ length: 20 }, (_, i) => attempt(u.email, `198.51.101.${i + 1}`)));
    expect(byAccount.filter((o) => o === "invalid")).toHaveLength(5);
    expect(byAccount.filter((o) => o === "locked")).toHaveLength(15);
    const from = "203.0.113.99";
    const byAddress = await Promise.all(Array.from({ length: 24 }, (_, i) => attempt(`race-${i}-${Date.now()}@example.com`, from)));
    expect(byAddress.filter((o) => o === "invalid")).toHaveLength(20);
  });

  it("locks a client address after 20 failures across accounts", async () => {
    const from = "203.0.113.7";
    for (let i = 0; i < 20; i++) {
      expect((await login(`nobody-${i}-${Date.now()}@example.com`, "wrong password", from)).status).toBe(401);
    }
    const locked = await login(viewer.email, TEST_PASSWORD, from);
    expect(locked.status).toBe(429);
    expect(Number(locked.headers.get("retry-after"))).toBeGreaterThan(0);
    // The same account from elsewhere still signs in.
    expect((await login(viewer.email, TEST_PASSWORD, "203.0.113.8")).status).toBe(200);
    const { rows } = await owner().query("select details from snapbase.audit_log where action = 'sign_in_locked' and details->>'address' = $1", [from]);
    expect(rows[0].details).toMatchObject({ scope: "address", failures: 20 });
  });

  it("counts every aliased authenticate of one GraphQL request, answering HTTP 429", async () => {
    const u = await createUser("viewer", "aliases");
    const fields = Array.from({ length: 8 }, (_, i) => `a${i}: authenticate(input: { email: $email, password: "wrong ${i}" }) { result }`).join("\n");
    const res = await graphql(server.url, `mutation($email: String!) { ${fields} }`, { email: u.email }, undefined, { "x-forwarded-for": "198.51.100.50" });
    const codes = res.body.errors!.map((e) => e.extensions?.code);
    expect(codes.slice(0, 5)).toEqual(Array(5).fill("28P01"));
    expect(codes.slice(5)).toEqual(Array(3).fill("too_many_attempts"));
    expect(res.status).toBe(429);
    expect(Number(res.headers.get("retry-after"))).toBeGreaterThan(0);
    const right = await graphql(server.url, `mutation($email: String!) { authenticate(input: { email: $email, password: "${TEST_PASSWORD}" }) { result } }`,
      { email: u.email }, undefined, { "x-forwarded-for": "198.51.100.51" });
    expect(right.body.errors?.[0]?.extensions?.code).toBe("too_many_attempts");
  });
});

describe("hostile sign-in input", () => {
  it("SQL in the email, a huge password and a forged forwarding header are plain data", async () => {
    const sql = await login("x'); delete from snapbase.users; --@example.com", "' or '1'='1", "198.51.100.90");
    expect(sql.status).toBe(401);
    expect((await owner().query("select count(*)::int as n from snapbase.users where id = $1", [viewer.id])).rows[0].n).toBe(1);
    const huge = await login(viewer.email, "p".repeat(100_000), "198.51.100.91");
    expect(huge.status).toBe(401);
    // Not an address: the failure is counted against the proxy that forwarded it.
    const forged = await login(`forged-${Date.now()}@example.com`, "wrong password", "'; drop table x; --");
    expect(forged.status).toBe(401);
    const { rows } = await owner().query("select key from snapbase_private.login_throttle where scope = 'address' and key like '%drop%'");
    expect(rows).toEqual([]);
    const gql = await graphql(server.url, `mutation { authenticate(input: { email: null, password: "x" }) { result } }`);
    expect(gql.body.errors?.[0]?.extensions?.code).toBe("invalid_body");
  });
});

describe("the JWT secret is out of reach of requests", () => {
  it("GraphQL authenticate and REST login return a JWT the server signed; psql gets the session's claims", async () => {
    const gql = await graphql(server.url, `mutation($e: String!, $p: String!) { authenticate(input: { email: $e, password: $p }) { result } }`, { e: viewer.email, p: TEST_PASSWORD });
    const claims = jwt.verify(gql.body.data.authenticate.result, db.jwtSecret, { audience: "snapbase" }) as jwt.JwtPayload;
    expect(claims).toMatchObject({ user_id: Number(viewer.id), role: "viewer", typ: "session" });
    expect(typeof claims.sid).toBe("string");
    const { rows } = await owner().query("select * from snapbase.authenticate($1, $2)", [viewer.email, TEST_PASSWORD]);
    expect(rows[0]).toMatchObject({ user_id: viewer.id, email: viewer.email, role: "viewer", kind: "session" });
    expect(rows[0].session_id).toBeTruthy();
  });

  it("is in no table, view, setting or function source of the database, and no request role reads a setting holding it", async () => {
    const root = new pg.Client({ connectionString: withUrlParts(db.rootUrl, { database: databaseName(db.ownerUrl) }) });
    await root.connect();
    try {
      const relations = await root.query(`select format('%I.%I', n.nspname, c.relname) as name from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind in ('r', 'v', 'm', 'p') and n.nspname not in ('pg_catalog', 'information_schema') and n.nspname not like 'pg_toast%'`);
      const holding: string[] = [];
      for (const { name } of relations.rows) {
        const { rows } = await root.query(`select count(*)::int as n from ${name} t where strpos(t::text, $1) > 0`, [db.jwtSecret]);
        if (rows[0].n > 0) holding.push(name);
      }
      expect(holding).toEqual([]);
      const functions = await root.query("select p.oid::regprocedure::text as f from pg_proc p where strpos(p.prosrc, $1) > 0 or p.prosrc ~* 'jwt_secret'", [db.jwtSecret]);
      expect(functions.rows).toEqual([]);
      const settings = await root.query("select count(*)::int as n from pg_db_role_setting s where strpos(array_to_string(s.setconfig, ','), $1) > 0", [db.jwtSecret]);
      expect(settings.rows[0].n).toBe(0);
    } finally {
      await root.end();
    }
    for (const role of ["anonymous", "viewer", "editor", "admin", "agent"] as const) {
      const leaked = await asActor({ role, userId: admin.id, email: admin.email }, (c) =>
        c.query("select name from pg_settings where strpos(coalesce(setting, ''), $1) > 0", [db.jwtSecret]));
      expect(leaked.rows).toEqual([]);
    }
    // The server signs; nothing in the database can.
    const signers = await owner().query("select count(*)::int as n from pg_proc where proname in ('sign_jwt', 'set_jwt_secret') and pronamespace = 'snapbase_private'::regnamespace");
    expect(signers.rows[0].n).toBe(0);
  });
});
