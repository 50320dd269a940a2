// Request parameters every REST route reads the same way.
import type { Request } from "express";
import { HttpError } from "../server/errors.ts";

/** A path parameter that must be a database id (a positive bigint); 400 otherwise. */
export function idParam(req: Request, name = "id"): string {
  const raw = req.params[name];
  if (typeof raw !== "string" || !/^[1-9][0-9]{0,17}$/.test(raw)) {
    throw new HttpError(400, "invalid_id", `${name} must be a positive integer (got ${JSON.stringify(raw)})`);
  }
  return raw;
}
