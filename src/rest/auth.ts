// REST sign-in: the same throttled sign-in as GraphQL's `authenticate`.
import type { IncomingMessage } from "node:http";
import { Router } from "express";
import type pg from "pg";
import { signIn } from "../auth/sign-in.ts";
import { HttpError } from "../server/errors.ts";

export function authRoutes(deps: { pool: pg.Pool; jwtSecret: string; clientAddress: (req: IncomingMessage) => string | undefined }): Router {
  const router = Router();
  router.post("/auth/login", async (req, res) => {
    const body = req.body as unknown;
    const email = (body as { email?: unknown } | undefined)?.email;
    const password = (body as { password?: unknown } | undefined)?.password;
    if (typeof email !== "string" || typeof password !== "string" || email === "" || password === "") {
      throw new HttpError(400, "invalid_body", 'send a JSON body {"email": "...", "password": "..."}');
    }
    res.json({ token: await signIn(deps, email, password, deps.clientAddress(req), req.abortSignal) });
  });
  return router;
}
