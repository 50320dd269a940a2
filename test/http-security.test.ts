// The HTTP surface under attack: GraphQL cost limits, production defaults (GraphiQL,
// introspection, suggestions), security headers, CORS, and anonymous REST calls.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ConfigError, loadConfig } from "../src/config.ts";
import type { RunningServer } from "../src/server/app.ts";
import { createUser, graphql, http, owner, startTestServer, tokenFor, type TestUser } from "./helpers.ts";

let dev: RunningServer;
let prod: RunningServer;
let viewer: TestUser;

beforeAll(async () => {
  [dev, prod] = await Promise.all([
    startTestServer(),
    startTestServer({ http: { graphiql: false, publicIntrospection: false, suggestions: false, corsOrigins: ["https://app.example.com"] } }),
  ]);
  viewer = await createUser("viewer", "hardening");
});
afterAll(async () => {
  await Promise.all([dev?.close(), prod?.close()]);
});

describe("anonymous REST calls", () => {
  it("get 401 in the documented error shape, not 403 permission denied", async () => {
    for (const [method, path] of [["GET", "/api/v1/changes"], ["POST", "/api/v1/changes"], ["GET", "/api/v1/snapshots/1"], ["GET", "/api/v1/changes/events"]] as const) {
      const res = await http(dev.url, method, path, method === "POST" ? { body: {} } : {});
      expect(res.status, `${method} ${path}`).toBe(401);
      expect(res.body.error.code).toBe("authentication_required");
      expect(res.body.error.message).toMatch(/sign in/);
      expect(res.headers.get("www-authenticate")).toMatch(/^Bearer/);
    }
    // Sign-in and share links stay open.
    expect((await http(dev.url, "GET", "/api/v1/share/sbs_nope")).status).toBe(404);
    expect((await http(dev.url, "POST", "/api/v1/auth/login", { body: {} })).status).toBe(400);
  });
});

describe("GraphQL cost limits", () => {
  const codeOf = (res: { body: { errors?: { extensions?: { code?: string } }[] } }) => res.body.errors?.[0]?.extensions?.code;

  it("refuses too many aliases with a clear error", async () => {
    const query = `{ ${Array.from({ length: 100 }, (_, i) => `a${i}: currentAppRole`).join(" ")} }`;
    const res = await graphql(dev.url, query);
    expect(codeOf(res)).toBe("too_many_aliases");
    expect(res.body.errors?.[0]?.message).toMatch(/at most 20 aliases.*found 100/);
    expect(res.body.data).toBeUndefined();
  });

  it("refuses a too-deep query with a clear error, not an internal error", async () => {
    let selection = "email";
    for (let i = 0; i < 40; i++) selection = `userByUserId { apiTokensByUserId { nodes { ${selection} } } }`;
    const res = await graphql(dev.url, `{ currentUser { apiTokensByUserId { nodes { ${selection} } } } }`, {}, await tokenFor(viewer));
    expect(res.body.errors?.[0]?.message).not.toBe("internal error");
    expect(codeOf(res)).toBe("query_too_deep");
    expect(res.body.errors?.[0]?.message).toMatch(/depth of at most 12/);
  });

  it("refuses an operation whose estimated cost is too high", async () => {
    const res = await graphql(dev.url, "{ allUsers(first: 1000) { nodes { email apiTokensByUserId(first: 1000) { nodes { name scopes } } } } }", {}, await tokenFor(viewer));
    expect(codeOf(res)).toBe("query_too_costly");
    expect(res.body.errors?.[0]?.message).toMatch(/cost/);
  });

  it("counts page sizes given in variables, and refuses one above the maximum, with a clear error", async () => {
    const token = await tokenFor(viewer);
    const nested = "query($n: Int, $m: Int) { allUsers(first: $n) { nodes { email apiTokensByUserId(first: $m) { nodes { name scopes } } } } }";
    const costly = await graphql(dev.url, nested, { n: 1000, m: 1000 }, token);
    expect(codeOf(costly)).toBe("query_too_costly");
    const huge = await graphql(dev.url, `query($n: Int) { snapshotRows(snapshotId: "1", first: $n) { totalCount } }`, { n: 100000 }, token);
    expect(codeOf(huge)).toBe("page_too_large");
    expect(huge.body.errors?.[0]?.message).toMatch(/first.*at most 1000.*100000/);
    // A literal one is already refused by the cost rule while the document is validated.
    const literal = await graphql(dev.url, `{ allUsers(first: 100000) { nodes { email } } }`, {}, token);
    expect(codeOf(literal)).toBe("query_too_costly");
    // Small pages through variables go through.
    const fine = await graphql(dev.url, nested, { n: 5, m: 5 }, token);
    expect(fine.body.errors).toBeUndefined();
  });

  it("gives a connection asked for without first or last a default page, counted in its cost", async () => {
    const token = await tokenFor(await createUser("admin", "pager"));
    await owner().query("insert into snapbase.users (email) select 'paged-' || i || '-' || md5(random()::text) || '@example.com' from generate_series(1, 120) i");
    const all = await graphql(dev.url, "{ allUsers { totalCount nodes { email } pageInfo { hasNextPage } } }", {}, token);
    expect(all.body.errors).toBeUndefined();
    expect(all.body.data.allUsers.totalCount).toBeGreaterThan(120);
    expect(all.body.data.allUsers.nodes.length).toBe(100);
    expect(all.body.data.allUsers.pageInfo.hasNextPage).toBe(true);
    // Unpaged nesting is estimated with the default page at each level.
    const nested = await graphql(dev.url, "{ allUsers { nodes { apiTokensByUserId { nodes { name userByUserId { apiTokensByUserId { nodes { name } } } } } } } }", {}, token);
    expect(codeOf(nested)).toBe("query_too_costly");
  });

  it("lets an ordinary query through", async () => {
    const res = await graphql(dev.url, "{ a: currentAppRole b: currentAppRole currentUser { email apiTokensByUserId(first: 50) { nodes { name } } } }", {}, await tokenFor(viewer));
    expect(res.body.errors).toBeUndefined();
    expect(res.body.data.a).toBe("viewer");
  });
});

describe("production defaults", () => {
  it("development serves GraphiQL, introspection and suggestions", async () => {
    const page = await fetch(dev.url + "/graphiql", { headers: { accept: "text/html" } });
    expect(page.status).toBe(200);
    expect((await graphql(dev.url, "{ __schema { queryType { name } } }")).body.data).toEqual({ __schema: { queryType: { name: "Query" } } });
    expect((await graphql(dev.url, "{ currentAppRol }")).body.errors?.[0]?.message).toMatch(/Did you mean/);
  });

  it("production serves no GraphiQL", async () => {
    const page = await fetch(prod.url + "/graphiql", { headers: { accept: "text/html" } });
    expect(page.status).toBe(404);
    const ruru = await fetch(prod.url + "/graphql", { headers: { accept: "text/html" } });
    expect(await ruru.text()).not.toMatch(/ruru/i);
  });

  it("production refuses anonymous introspection, but a signed-in user may introspect", async () => {
    for (const query of ["{ __schema { queryType { name } } }", '{ __type(name: "Query") { name } }', "query { ...F } fragment F on Query { __schema { types { name } } }"]) {
      const res = await graphql(prod.url, query);
      expect(res.body.errors?.[0]?.extensions?.code, query).toBe("introspection_disabled");
      expect(res.body.data ?? null).toBeNull();
    }
    const signedIn = await graphql(prod.url, "{ __schema { queryType { name } } }", {}, await tokenFor(viewer));
    expect(signedIn.body.data).toEqual({ __schema: { queryType: { name: "Query" } } });
    expect((await graphql(prod.url, "{ __typename }")).body.data).toEqual({ __typename: "Query" });
  });

  it("production gives no 'Did you mean' suggestions", async () => {
    const field = await graphql(prod.url, "{ currentAppRol }");
    expect(field.body.errors?.[0]?.message).toBe('Cannot query field "currentAppRol" on type "Query".');
    const arg = await graphql(prod.url, `mutation { setUserRole(input: { userId: "1", role: admn }) { clientMutationId } }`);
    expect(arg.body.errors?.[0]?.message).not.toMatch(/Did you mean/);
    const variable = await graphql(prod.url, `mutation($r: UserRole!) { setUserRole(input: { userId: "1", role: $r }) { clientMutationId } }`, { r: "admn" });
    expect(variable.body.errors?.[0]?.message).not.toMatch(/Did you mean/);
  });

  it("configuration: production turns them off unless a setting enables them, and lists bad values", () => {
    const base = { NODE_ENV: "production", DATABASE_URL: "postgres://o@db/x", JWT_SECRET: "s".repeat(32), SNAPBASE_CREDENTIALS_KEY: "k".repeat(32) };
    expect(loadConfig(base).http).toMatchObject({ graphiql: false, publicIntrospection: false, suggestions: false, corsOrigins: [], trustProxy: false });
    expect(loadConfig({ ...base, GRAPHIQL: "true", GRAPHQL_PUBLIC_INTROSPECTION: "true", GRAPHQL_SUGGESTIONS: "true" }).http)
      .toMatchObject({ graphiql: true, publicIntrospection: true, suggestions: true });
    expect(loadConfig({ NODE_ENV: "development" }).http).toMatchObject({ graphiql: true, publicIntrospection: true, suggestions: true });
    expect(loadConfig({ ...base, CORS_ORIGINS: "https://a.example.com, https://b.example.com", TRUST_PROXY: "1" }).http)
      .toMatchObject({ corsOrigins: ["https://a.example.com", "https://b.example.com"], trustProxy: 1 });
    let problems: string[] = [];
    try {
      loadConfig({ ...base, CORS_ORIGINS: "app.example.com", GRAPHQL_MAX_DEPTH: "0", LOGIN_MAX_FAILURES: "x", LOGIN_LOCKOUT: "soon" });
    } catch (error) {
      problems = (error as ConfigError).problems;
    }
    expect(problems).toEqual([
      expect.stringMatching(/^CORS_ORIGINS/),
      expect.stringMatching(/^GRAPHQL_MAX_DEPTH/),
      expect.stringMatching(/^LOGIN_MAX_FAILURES /),
      expect.stringMatching(/^LOGIN_LOCKOUT/),
    ]);
  });
});

describe("security headers and CORS", () => {
  it("every response carries security headers", async () => {
    const res = await fetch(dev.url + "/healthz");
    expect(res.headers.get("x-content-type-options")).toBe("nosniff");
    expect(res.headers.get("x-frame-options")).toBe("DENY");
    expect(res.headers.get("referrer-policy")).toBe("no-referrer");
    const csp = res.headers.get("content-security-policy") ?? "";
    expect(csp).toMatch(/default-src 'self'/);
    expect(csp).toMatch(/frame-ancestors 'none'/);
    expect(csp).not.toMatch(/upgrade-insecure-requests/);
  });

  it("GraphiQL's inline scripts carry the nonce its Content-Security-Policy allows", async () => {
    const page = await fetch(dev.url + "/graphiql", { headers: { accept: "text/html" } });
    const csp = page.headers.get("content-security-policy") ?? "";
    const nonce = /script-src [^;]*'nonce-([^']+)'/.exec(csp)?.[1];
    expect(nonce).toBeTruthy();
    expect(csp).not.toMatch(/script-src [^;]*'unsafe-inline'/);
    const html = await page.text();
    const scripts = html.match(/<script\b[^>]*>/g) ?? [];
    expect(scripts.length).toBeGreaterThan(0);
    for (const tag of scripts) expect(tag).toContain(`nonce="${nonce}"`);
    // A new nonce for every page.
    const again = await fetch(dev.url + "/graphiql", { headers: { accept: "text/html" } });
    expect(again.headers.get("content-security-policy")).not.toContain(nonce!);
  });

  it("answers CORS only for the configured origins", async () => {
    const preflight = (base: string, origin: string) =>
      fetch(base + "/graphql", {
        method: "OPTIONS",
        headers: { origin, "access-control-request-method": "POST", "access-control-request-headers": "authorization, content-type" },
      });
    const allowed = await preflight(prod.url, "https://app.example.com");
    expect(allowed.status).toBe(204);
    expect(allowed.headers.get("access-control-allow-origin")).toBe("https://app.example.com");
    expect(allowed.headers.get("access-control-allow-headers")?.toLowerCase()).toContain("authorization");
    const other = await preflight(prod.url, "https://evil.example.com");
    expect(other.headers.get("access-control-allow-origin")).toBeNull();
    const none = await preflight(dev.url, "https://app.example.com");
    expect(none.headers.get("access-control-allow-origin")).toBeNull();
    const get = await fetch(prod.url + "/healthz", { headers: { origin: "https://app.example.com" } });
    expect(get.headers.get("access-control-allow-origin")).toBe("https://app.example.com");
  });
});
