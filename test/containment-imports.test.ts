// Containment of CSV import mappings: type names and column names in a mapping.
// Each attack must be refused with a clear error and leave no trace (see containment.ts).
import { describe, it } from "vitest";
import { containmentSuite, tokens, gql, refused, stagedImport, HOSTILE_TYPES } from "./containment.ts";

containmentSuite();

describe("CSV import mappings", () => {
  for (const [type, expected] of HOSTILE_TYPES) {
    it(`refuses the type ${JSON.stringify(type.slice(0, 40))} in a preview and an import`, async () => {
      const importId = await stagedImport();
      const mapping = { extra: { new_scratch: "s1", type } };
      await refused(() => gql(tokens.editor!, `query($i: BigInt!, $m: JSON!) { csvImportPreview(importId: $i, mapping: $m) }`, { i: importId, m: mapping }) as any, expected);
      await refused(() => gql(tokens.editor!, `mutation($i: BigInt!, $m: JSON!) { importCsv(input: { importId: $i, mapping: $m }) { result } }`, { i: importId, m: mapping }) as any, expected);
    });
  }
  const badMappings: [unknown, RegExp][] = [
    [{ extra: "name\"; drop table snapbase.users; --" }, /columns the table does not have/],
    [{ extra: { new_scratch: "__id", type: "text" } }, /reserved for metadata/],
    [{ extra: { new_scratch: "xmin", type: "text" } }, /system column|xmin/],
    [{ extra: { new_scratch: "", type: "text" } }, /1 to 63 characters/],
    [{ extra: { new_scratch: "n".repeat(64), type: "text" } }, /1 to 63 characters/],
    [{ extra: { new_scratch: "s1", type: "text", extra: "x" } }, /\{"new_scratch": name, "type": type\}/],
    [{ extra: 5 }, /a column name, null/],
    [{ nope: "name" }, /headers the file does not have/],
    [["extra"], /mapping must be an object/],
  ];
  for (const [mapping, expected] of badMappings) {
    it(`refuses the mapping ${JSON.stringify(mapping).slice(0, 60)}`, async () => {
      const importId = await stagedImport();
      await refused(() => gql(tokens.editor!, `query($i: BigInt!, $m: JSON!) { csvImportPreview(importId: $i, mapping: $m) }`, { i: importId, m: mapping }) as any, expected);
    });
  }
});
