// The key pair that protects connector credentials.
//
// PostgreSQL seals credentials with the public key (pgcrypto's pgp_pub_encrypt), so
// storing them needs no secret: no request, and no SECURITY DEFINER function a
// request can call, ever holds one. The secret key is stored sealed under
// SNAPBASE_CREDENTIALS_KEY (AES-256-GCM) and only the worker unseals it, to open
// credentials right before it connects (snapbase_private.account_credentials).
//
// pgcrypto reads OpenPGP key packets: a primary key (which it skips) followed by the
// encryption subkey. We write both from one RSA key that Node generates.
import { createCipheriv, createDecipheriv, generateKeyPairSync, randomBytes, scryptSync } from "node:crypto";
import type pg from "pg";

export interface CredentialKeys {
  /** Public key packets, as stored (base64) in snapbase_private.settings. */
  publicKey: Buffer;
  /** Secret key packets: only ever in the worker's memory and bind parameters. */
  secretKey: Buffer;
}

/** An OpenPGP multiprecision integer: bit length (2 bytes), then the big-endian bytes. */
function mpi(bytes: Buffer): Buffer {
  let start = 0;
  while (start < bytes.length - 1 && bytes[start] === 0) start++;
  const value = bytes.subarray(start);
  const bits = (value.length - 1) * 8 + (32 - Math.clz32(value[0]!));
  const head = Buffer.alloc(2);
  head.writeUInt16BE(bits);
  return Buffer.concat([head, value]);
}

/** A new-format OpenPGP packet. */
function packet(tag: number, body: Buffer): Buffer {
  const length = body.length;
  let head: Buffer;
  if (length < 192) head = Buffer.from([0xc0 | tag, length]);
  else if (length < 8384) head = Buffer.from([0xc0 | tag, ((length - 192) >> 8) + 192, (length - 192) & 0xff]);
  else {
    head = Buffer.alloc(6);
    head[0] = 0xc0 | tag;
    head[1] = 255;
    head.writeUInt32BE(length, 2);
  }
  return Buffer.concat([head, body]);
}

export function generateCredentialKeys(): CredentialKeys {
  const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 3072 });
  const jwk = privateKey.export({ format: "jwk" });
  const part = (name: "n" | "e" | "d" | "p" | "q" | "qi") => Buffer.from(jwk[name]!, "base64url");
  const created = Buffer.alloc(4);
  created.writeUInt32BE(Math.floor(Date.now() / 1000));
  // Version 4, creation time, algorithm 1 (RSA), n, e.
  const publicBody = Buffer.concat([Buffer.from([4]), created, Buffer.from([1]), mpi(part("n")), mpi(part("e"))]);
  // OpenPGP wants d, p, q and u = p⁻¹ mod q; the JWK's qi is q⁻¹ mod p, so p and q swap places.
  const secret = Buffer.concat([mpi(part("d")), mpi(part("q")), mpi(part("p")), mpi(part("qi"))]);
  let sum = 0;
  for (const byte of secret) sum = (sum + byte) & 0xffff;
  const checksum = Buffer.alloc(2);
  checksum.writeUInt16BE(sum);
  const secretBody = Buffer.concat([publicBody, Buffer.from([0]), secret, checksum]);
  return {
    publicKey: Buffer.concat([packet(6, publicBody), packet(14, publicBody)]),
    secretKey: Buffer.concat([packet(5, secretBody), packet(7, secretBody)]),
  };
}

const SEAL_VERSION = "v1";

function sealingKey(credentialsKey: string, salt: Buffer): Buffer {
  return scryptSync(credentialsKey, salt, 32);
}

/** The secret key sealed under SNAPBASE_CREDENTIALS_KEY: "v1.salt.iv.tag.ciphertext" (base64url). */
export function sealSecretKey(secretKey: Buffer, credentialsKey: string): string {
  const salt = randomBytes(16);
  const iv = randomBytes(12);
  const cipher = createCipheriv("aes-256-gcm", sealingKey(credentialsKey, salt), iv);
  const body = Buffer.concat([cipher.update(secretKey), cipher.final()]);
  return [SEAL_VERSION, salt, iv, cipher.getAuthTag(), body].map((p) => (typeof p === "string" ? p : p.toString("base64url"))).join(".");
}

export function unsealSecretKey(sealed: string, credentialsKey: string): Buffer {
  const [version, salt, iv, tag, body] = sealed.split(".");
  if (version !== SEAL_VERSION || !salt || !iv || !tag || !body) throw new Error("the stored credentials key has an unknown format");
  const decipher = createDecipheriv("aes-256-gcm", sealingKey(credentialsKey, Buffer.from(salt, "base64url")), Buffer.from(iv, "base64url"));
  decipher.setAuthTag(Buffer.from(tag, "base64url"));
  try {
    return Buffer.concat([decipher.update(Buffer.from(body, "base64url")), decipher.final()]);
  } catch {
    throw new Error(
      "SNAPBASE_CREDENTIALS_KEY does not open the stored credentials key: it is not the key this database was set up with",
    );
  }
}

/**
 * Makes sure the database has a credentials key pair (the first server or worker to
 * start creates it; concurrent starts agree on one) and that SNAPBASE_CREDENTIALS_KEY
 * opens it. Returns the secret key. Credentials sealed the old way (symmetrically,
 * with SNAPBASE_CREDENTIALS_KEY itself) are re-sealed with the public key.
 */
export async function ensureCredentialKeys(owner: pg.ClientBase, credentialsKey: string): Promise<Buffer> {
  const fresh = generateCredentialKeys();
  await owner.query(
    `insert into snapbase_private.settings (key, value)
     select * from unnest($1::text[], $2::text[]) on conflict (key) do nothing`,
    [
      ["credentials_public_key", "credentials_secret_key_sealed"],
      [fresh.publicKey.toString("base64"), sealSecretKey(fresh.secretKey, credentialsKey)],
    ],
  );
  const { rows } = await owner.query<{ sealed: string | null }>(
    "select snapbase_private.setting('credentials_secret_key_sealed') as sealed",
  );
  const secretKey = unsealSecretKey(rows[0]!.sealed!, credentialsKey);
  await owner.query(
    `update snapbase_private.connector_credentials
        set secret = public.pgp_pub_encrypt(public.pgp_sym_decrypt(secret, $1), decode(snapbase_private.setting('credentials_public_key'), 'base64')),
            scheme = 'public_key'
      where scheme = 'symmetric'`,
    [credentialsKey],
  );
  return secretKey;
}
