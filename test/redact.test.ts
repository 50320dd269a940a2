// Connection strings are shown and logged through one masking helper
// (src/redact.ts): no password survives, wherever the string put it (user info,
// a password with @ in it, the query string, key=value form).
import { describe, expect, it } from "vitest";
import { ConfigError, loadConfig } from "../src/config.ts";
import { postgresConnector } from "../src/connectors/postgres.ts";
import { urlParts } from "../src/db/urls.ts";
import { log } from "../src/log.ts";
import { maskConnectionString, redactText, secretsOfConnectionString } from "../src/redact.ts";
import { db, logged } from "./helpers.ts";

const cases: [string, string, string[]][] = [
  ["postgres://alice:s3cret-pw@db.example.com:5432/app", "postgres://alice:***@db.example.com:5432/app", ["s3cret-pw"]],
  ["postgres://alice:p@ss@word@db.example.com/app", "postgres://alice:***@db.example.com/app", ["p@ss@word", "ss@word", "word@db"]],
  ["postgresql://alice:pa%40ss%2Fw@db.example.com/app?sslmode=require", "postgresql://alice:***@db.example.com/app?sslmode=require", ["pa%40ss", "pa@ss/w"]],
  ["postgres://alice@db.example.com/app?sslmode=require&password=qs-secret&application_name=x", "postgres://alice@db.example.com/app?sslmode=require&password=***&application_name=x", ["qs-secret"]],
  ["postgres:///app?host=/tmp&user=alice&sslpassword=key-secret", "postgres:///app?host=/tmp&user=alice&sslpassword=***", ["key-secret"]],
  ["mysql://root:my-secret@10.0.0.1:3306/shop", "mysql://root:***@10.0.0.1:3306/shop", ["my-secret"]],
  ["host=db.example.com user=alice password='a b\\'c' dbname=app", "host=db.example.com user=alice password=*** dbname=app", ["a b", "\\'c"]],
  ["host=db.example.com password=plain-secret dbname=app", "host=db.example.com password=*** dbname=app", ["plain-secret"]],
  ["postgres://db.example.com/app", "postgres://db.example.com/app", []],
];

describe("maskConnectionString", () => {
  for (const [input, shown, secrets] of cases) {
    it(`shows ${JSON.stringify(input)} as ${JSON.stringify(shown)}`, () => {
      expect(maskConnectionString(input)).toBe(shown);
      for (const s of secrets) expect(maskConnectionString(input)).not.toContain(s);
      // Inside any text, as a log line or an error message would carry it.
      const text = `could not connect with ${input} (attempt 2)`;
      expect(redactText(text)).toBe(`could not connect with ${shown} (attempt 2)`);
    });
  }

  it("knows every secret a connection string holds, encoded or not", () => {
    expect(secretsOfConnectionString("postgres://a:p%40ss@h/db?password=q1&sslpassword=q2").sort()).toEqual(["p%40ss", "p@ss", "q1", "q2"]);
    expect(redactText("role a: password p@ss rejected, q1 and q2 too", secretsOfConnectionString("postgres://a:p%40ss@h/db?password=q1&sslpassword=q2")))
      .toBe("role a: password *** rejected, *** and *** too");
  });
});

describe("where connection strings are shown or logged", () => {
  it("a bad DATABASE_URL is reported without its password", () => {
    for (const [url, secret] of [["mysql://app:p@ss@db.example.com/app", "ss@"], ["http://app@db.example.com/app?password=hunter2", "hunter2"], ["postgres://app:hunter2@db.example.com", "hunter2"]] as const) {
      let message = "";
      try {
        loadConfig({ DATABASE_URL: url });
      } catch (error) {
        expect(error).toBeInstanceOf(ConfigError);
        message = (error as Error).message;
      }
      expect(message).toMatch(/DATABASE_URL/);
      expect(message).not.toContain(secret);
      expect(message).not.toContain("p@ss");
    }
  });

  it("logs mask any connection string in a message or a field", () => {
    // Tests keep log lines in memory (test/log-sink.ts): the line as it would be written.
    const from = logged.length;
    log.error("cannot reach postgres://app:hunter2@db/app", { error: "Error: connect postgres://app:p@ss@db/app?password=qs failed", nested: { url: "mysql://root:rootpw@h/x" } });
    const line = logged.slice(from).join("\n");
    for (const secret of ["hunter2", "p@ss", "ss@db", "qs failed", "rootpw"]) expect(line).not.toContain(secret);
    expect(JSON.parse(line).msg).toBe("cannot reach postgres://app:***@db/app");
  });

  it("a PostgreSQL connector's errors never carry its password, wherever the connection string put it", async () => {
    // The server's own password (or any, where it trusts local connections), echoed
    // back by the server in an error about a setting given the same value.
    const server = urlParts(db.rootUrl);
    const host = server.port ? `${server.host}:${server.port}` : server.host;
    const secret = server.password || "QSECRET-1";
    const echo = `options=${encodeURIComponent(`-c statement_timeout=${secret}`)}`;
    for (const cs of [
      `postgres://${encodeURIComponent(server.user)}@${host}/postgres?password=${encodeURIComponent(secret)}&${echo}`,
      `postgres://${encodeURIComponent(server.user)}:${encodeURIComponent(secret)}@${host}/postgres?${echo}`,
    ]) {
      const connector = postgresConnector({ connectionString: cs });
      const failure = await connector.test().then(() => null, (error: Error) => error.message);
      await connector.close();
      expect(failure).toMatch(/statement_timeout/);
      expect(failure).not.toContain(secret);
    }
  });
});
