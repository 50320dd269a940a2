// The test databases: one template per run (migrated by global-setup.ts) and one
// copy of it per test file (made by setup-file.ts). Copies carry a comment naming
// their template, so a run finds and drops its own copies and nobody else's.
import { createHash } from "node:crypto";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type pg from "pg";

const testFolder = path.dirname(fileURLToPath(import.meta.url));

const copyComment = (template: string): string => `snapbase test database, a copy of ${template}`;

/** `<template>_<file>`, e.g. snapbase_test_jobs for test/jobs.test.ts, within PostgreSQL's 63 bytes. */
export function copyName(template: string, testPath: string): string {
  const file = path.relative(testFolder, testPath).replace(/\.test\.ts$/, "");
  const name = `${template}_${file.toLowerCase().replace(/[^a-z0-9_]+/g, "_")}`;
  if (Buffer.byteLength(name) <= 63) return name;
  return `${Buffer.from(name).subarray(0, 54).toString().replace(/\uFFFD$/, "")}_${createHash("sha1").update(name).digest("hex").slice(0, 8)}`;
}

/** A fresh copy of the template (any earlier one of that name is dropped), owned by `owner`. */
export async function createCopy(root: pg.Client, template: string, name: string, owner: string): Promise<void> {
  const id = root.escapeIdentifier(name);
  await root.query(`drop database if exists ${id} with (force)`);
  await root.query(`create database ${id} template ${root.escapeIdentifier(template)} owner ${root.escapeIdentifier(owner)}`);
  await root.query(`comment on database ${id} is ${root.escapeLiteral(copyComment(template))}`);
}

/** Drops every copy of `template`. */
export async function dropCopies(root: pg.Client, template: string): Promise<void> {
  const { rows } = await root.query<{ datname: string }>(
    "select datname from pg_database where shobj_description(oid, 'pg_database') = $1 order by datname",
    [copyComment(template)],
  );
  for (const { datname } of rows) await root.query(`drop database if exists ${root.escapeIdentifier(datname)} with (force)`);
}
