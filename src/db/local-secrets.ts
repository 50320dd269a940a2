// Development secrets generated once and kept beside the embedded data (never in git),
// so restarts reuse the same passwords and existing JWTs stay valid.
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync, existsSync } from "node:fs";
import path from "node:path";

export interface LocalSecrets {
  superuserPassword: string;
  ownerPassword: string;
  authenticatorPassword: string;
  jwtSecret: string;
  credentialsKey: string;
}

const generate = (): string => randomBytes(24).toString("base64url");

export function loadLocalSecrets(dataDir: string): LocalSecrets {
  const file = path.join(dataDir, "secrets.json");
  const fresh: LocalSecrets = {
    superuserPassword: generate(),
    ownerPassword: generate(),
    authenticatorPassword: generate(),
    jwtSecret: randomBytes(48).toString("base64url"),
    credentialsKey: randomBytes(32).toString("base64url"),
  };
  // Files from older versions lack newer secrets: those are added, the rest kept.
  const existing = existsSync(file) ? (JSON.parse(readFileSync(file, "utf8")) as Partial<LocalSecrets>) : undefined;
  const secrets = { ...fresh, ...existing };
  if (!existing || Object.keys(fresh).some((k) => !(k in existing))) {
    mkdirSync(dataDir, { recursive: true });
    writeFileSync(file, JSON.stringify(secrets, null, 2) + "\n", { mode: 0o600 });
  }
  return secrets;
}
