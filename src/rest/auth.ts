// REST sign-in: a thin wrapper over snapbase.authenticate().
import { Router } from "express";
import type pg from "pg";
import type { RoleNames } from "../config.ts";
import { withUserTransaction } from "../db/request-client.ts";
import { HttpError } from "../server/errors.ts";

export function authRoutes(deps: { pool: pg.Pool; roles: RoleNames }): Router {
  const router = Router();
  router.post("/auth/login", async (req, res) => {
    const body = req.body as unknown;
    const email = (body as { email?: unknown } | undefined)?.email;
    const password = (body as { password?: unknown } | undefined)?.password;
    if (typeof email !== "string" || typeof password !== "string" || email === "" || password === "") {
      throw new HttpError(400, "invalid_body", 'send a JSON body {"email": "...", "password": "..."}');
    }
    const token = await withUserTransaction(deps.pool, { role: deps.roles.anonymous }, async (client) => {
      const { rows } = await client.query<{ token: string }>("select snapbase.authenticate($1, $2) as token", [email, password]);
      return rows[0]!.token;
    }, req.abortSignal);
    res.json({ token });
  });
  return router;
}
