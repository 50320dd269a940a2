// Exact numbers in GraphQL's JSON values (workbook records, suggestions, job
// results, events). PostGraphile reads json and jsonb with JSON.parse (the codecs'
// fromPg in @dataplan/pg), where 9007199254740993 became 9007199254740992 and
// 12345678901234567890.0123456789 became 12345678901234567000. Fixed there, where
// the precision was lost, and on the way in:
// - out: json/jsonb values are parsed with the client rule of exact-json.ts (a
//   number a double cannot hold exactly is sent as a string of its digits), so a
//   client writing back what it read writes the exact value;
// - in: numbers in request variables keep their digits (ExactNumber: app.ts parses
//   /graphql bodies with that reviver), and the codecs' toPg (JSON.stringify) writes
//   them as sent. (Numbers typed inside a JSON object literal in the query text are
//   converted by Grafast itself with parseFloat: pass such values as variables, or
//   as strings.)
import { TYPES } from "postgraphile/@dataplan/pg";
import { parseJsonForClients } from "../exact-json.ts";

let installed = false;

/** json and jsonb values from PostgreSQL keep every digit (once per process). */
export function installExactJsonCodecs(): void {
  if (installed) return;
  for (const codec of [TYPES.json, TYPES.jsonb]) (codec as { fromPg: (text: string) => unknown }).fromPg = parseJsonForClients;
  installed = true;
}
