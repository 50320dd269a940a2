// Writing a streamed response with backpressure, without waiting forever for a
// client that has gone away.
import type { Response } from "express";
import { RequestAbortedError } from "../db/request-client.ts";

/** Writes the chunk; when the socket's buffer is full, waits until it drains or the
 *  client goes away (then throws RequestAbortedError, which releases the database). */
export async function writeOrWait(res: Response, chunk: string | Buffer): Promise<void> {
  if (res.destroyed || res.writableEnded) throw new RequestAbortedError();
  if (res.write(chunk)) return;
  await new Promise<void>((resolve, reject) => {
    const drained = () => {
      res.off("close", closed);
      resolve();
    };
    const closed = () => {
      res.off("drain", drained);
      reject(new RequestAbortedError());
    };
    res.once("drain", drained);
    res.once("close", closed);
  });
}
