// Issue 13, small fixes: GET / (and /api/v1) point a newcomer at what is there;
// the start-up banner does not ask for DEMO_PASSWORD when it is set; rejecting
// suggestions answers the same shape as accepting them.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { demoUsersBanner } from "../src/demo/index.ts";
import type { RunningServer } from "../src/server/app.ts";
import { createUser, graphqlData, http, startTestServer, TEST_PASSWORD, type TestUser } from "./helpers.ts";

let server: RunningServer;
let editor: TestUser;

beforeAll(async () => {
  server = await startTestServer();
  editor = await createUser("editor", "small");
});

afterAll(async () => {
  await server?.close();
});

describe("a newcomer opening the server", () => {
  it("GET / lists where everything is (JSON for programs, a page for browsers)", async () => {
    const json = await http(server.url, "GET", "/");
    expect(json.status).toBe(200);
    expect(json.body).toEqual({
      name: "Snapbase",
      graphql: `${server.url}/graphql`,
      graphiql: `${server.url}/graphiql`,
      rest: `${server.url}/api/v1`,
      health: `${server.url}/healthz`,
      readiness: `${server.url}/readyz`,
      sign_in: `POST ${server.url}/api/v1/auth/login {"email", "password"}`,
    });
    const page = await fetch(server.url + "/", { headers: { accept: "text/html" } });
    expect(page.status).toBe(200);
    expect(page.headers.get("content-type")).toMatch(/^text\/html/);
    const html = await page.text();
    for (const path of ["/graphql", "/graphiql", "/api/v1", "/healthz"]) expect(html).toContain(`href="${path}"`);
  });

  it("GET /api/v1 lists the REST endpoints instead of answering 404", async () => {
    const res = await http(server.url, "GET", "/api/v1");
    expect(res.status).toBe(200);
    expect(res.body.endpoints).toEqual(expect.arrayContaining([
      "POST /api/v1/auth/login", "GET /api/v1/changes?status=pending", "GET /api/v1/tables/{table_name}/snapshots", "GET /api/v1/snapshots/{id}",
    ]));
    expect((await http(server.url, "GET", "/api/v1/nope", { token: "x" })).status).toBe(401);
  });

  it("the start-up banner asks for DEMO_PASSWORD only when it is not set", () => {
    const created = { adminEmail: "admin@example.com", editorEmail: "editor@example.com", password: "generated-123" };
    const generated = demoUsersBanner(created, false);
    expect(generated).toContain("set DEMO_PASSWORD to choose it");
    expect(generated).toContain("generated-123");
    const chosen = demoUsersBanner({ ...created, password: "chosen-password" }, true);
    expect(chosen).not.toContain("set DEMO_PASSWORD");
    expect(chosen).not.toContain("chosen-password");
    expect(chosen).toContain("DEMO_PASSWORD");
    expect(chosen).toContain("admin@example.com");
  });
});

describe("suggestions", () => {
  it("reject answers the same shape as accept: {records, cells, created, deleted}", async () => {
    const token = (await http(server.url, "POST", "/api/v1/auth/login", { body: { email: editor.email, password: TEST_PASSWORD } })).body.token;
    const gql = async (query: string, variables: Record<string, unknown> = {}) => {
      return graphqlData(server.url, query, variables, token);
    };
    const wb = (await gql(`mutation { createWorkbook(input: { name: "Shapes" }) { result { rowId } } }`)).createWorkbook.result.rowId;
    const t = (await gql(`mutation($w: BigInt!) { addWorkbookTable(input: { workbookId: $w, name: "T", columns: [{ name: "a", type: "text" }, { name: "b", type: "integer" }] }) { result { rowId } } }`, { w: wb })).addWorkbookTable.result.rowId;
    const ids: string[] = [];
    for (let i = 0; i < 4; i++) ids.push((await gql(`mutation($t: BigInt!) { createRecord(input: { tableId: $t, values: { a: "x", b: 1 } }) { result } }`, { t })).createRecord.result.id);
    const suggest = async () => {
      await gql(`mutation($t: BigInt!, $r: BigInt!) { suggestValues(input: { tableId: $t, recordId: $r, values: { a: "y", b: 2 } }) { clientMutationId } }`, { t, r: ids[0] });
      await gql(`mutation($t: BigInt!, $r: BigInt!) { suggestValues(input: { tableId: $t, recordId: $r, values: { a: "z" } }) { clientMutationId } }`, { t, r: ids[1] });
      await gql(`mutation($t: BigInt!, $r: BigInt!) { suggestDelete(input: { tableId: $t, recordId: $r }) { clientMutationId } }`, { t, r: ids[2] });
      await gql(`mutation($t: BigInt!) { suggestNewRecord(input: { tableId: $t, values: { a: "new" } }) { clientMutationId } }`, { t });
    };
    await suggest();
    const rejected = (await gql(`mutation($t: BigInt!) { rejectSuggestions(input: { tableId: $t }) { result } }`, { t })).rejectSuggestions.result;
    await suggest();
    const accepted = (await gql(`mutation($t: BigInt!) { acceptSuggestions(input: { tableId: $t }) { result } }`, { t })).acceptSuggestions.result;
    expect(Object.keys(rejected).sort()).toEqual(Object.keys(accepted).sort());
    expect(accepted).toEqual({ records: 4, cells: 4, created: 1, deleted: 1 });
    expect(rejected).toEqual({ records: 4, cells: 4, created: 1, deleted: 1 });
    // One column only.
    await gql(`mutation($t: BigInt!, $r: BigInt!) { suggestValues(input: { tableId: $t, recordId: $r, values: { a: "q", b: 3 } }) { clientMutationId } }`, { t, r: ids[3] });
    const one = (await gql(`mutation($t: BigInt!) { rejectSuggestions(input: { tableId: $t, columnName: "b" }) { result } }`, { t })).rejectSuggestions.result;
    expect(one).toEqual({ records: 1, cells: 1, created: 0, deleted: 0 });
  });
});
