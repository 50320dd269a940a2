// Containment of table and column specs and scratch columns: names and type names.
// Each attack must be refused with a clear error and leave no trace (see containment.ts).
import { describe, expect, it } from "vitest";
import { containmentSuite, tokens, workbookId, tableId, gql, refused, HOSTILE_TYPES } from "./containment.ts";
import { owner } from "./helpers.ts";

containmentSuite();

describe("table and column specs", () => {
  for (const [type, expected] of HOSTILE_TYPES) {
    it(`refuses a column of type ${JSON.stringify(type.slice(0, 40))}`, async () => {
      await refused(() => gql(tokens.editor!, `mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "Evil", columns: $c }) { result { rowId } } }`,
        { w: workbookId, c: [{ name: "a", type }] }) as any, expected);
    });
  }
  const badSpecs: [unknown, RegExp][] = [
    [[{ name: "__id", type: "text" }], /reserved for metadata/],
    [[{ name: "ctid", type: "text" }], /system column|ctid/],
    [[{ name: "", type: "text" }], /1 to 63 characters/],
    [[{ name: "é".repeat(40), type: "text" }], /1 to 63 characters/],
    [[{ name: "a", type: "text" }, { name: "a", type: "integer" }], /unique/],
    [[{ name: "a", type: 5 }], /type must be a type name/],
    [[{ name: "a", type: "text", read_only: "yes; drop" }], /true or false/],
    [{ name: "a" }, /non-empty array/],
    [[], /non-empty array/],
    [["a"], /needs a name/],
  ];
  for (const [columns, expected] of badSpecs) {
    it(`refuses the spec ${JSON.stringify(columns).slice(0, 60)}`, async () => {
      await refused(() => gql(tokens.editor!, `mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "Evil", columns: $c }) { result { rowId } } }`,
        { w: workbookId, c: columns }) as any, expected);
    });
  }
  it("keeps hostile but valid names as data", async () => {
    const names = [`a"; drop table snapbase.users; --`, "Robert'); --", "日本語 列", "select", "n"];
    const created = await gql(tokens.editor!, `mutation($w: BigInt!, $c: JSON!) { addWorkbookTable(input: { workbookId: $w, name: "x'); drop table y; --", columns: $c }) { result { rowId columns } } }`,
      { w: workbookId, c: names.map((name) => ({ name, type: "text" })) });
    expect((created as any).data.addWorkbookTable.result.columns.map((c: any) => c.name)).toEqual(names);
    expect((await owner().query("select to_regclass('snapbase.users') is not null as ok")).rows[0].ok).toBe(true);
  });
});

describe("scratch columns", () => {
  for (const [type, expected] of HOSTILE_TYPES) {
    it(`refuses a scratch column of type ${JSON.stringify(type.slice(0, 40))}`, async () => {
      await refused(() => gql(tokens.editor!, `mutation($t: BigInt!, $ty: String!) { addScratchColumn(input: { tableId: $t, name: "s9", type: $ty }) { result { rowId } } }`,
        { t: tableId, ty: type }) as any, expected);
    });
  }
  for (const [name, expected] of [["__x", /reserved for metadata/], ["xmax", /system column/], ["", /1 to 63/], ["id", /exists already/]] as const) {
    it(`refuses a scratch column named ${JSON.stringify(name)}`, async () => {
      await refused(() => gql(tokens.editor!, `mutation($t: BigInt!, $n: String!) { addScratchColumn(input: { tableId: $t, name: $n, type: "text" }) { result { rowId } } }`,
        { t: tableId, n: name }) as any, expected);
    });
  }
  it("refuses to remove a column that is not a scratch column, whatever its name says", async () => {
    await refused(() => gql(tokens.editor!, `mutation($t: BigInt!) { removeScratchColumn(input: { tableId: $t, columnName: "id\\"; drop table snapbase.users; --" }) { result { rowId } } }`,
      { t: tableId }) as any, /no scratch column/);
  });
});
