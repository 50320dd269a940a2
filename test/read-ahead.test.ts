// The download task reads the next batch while writing the current one.
import { describe, expect, it } from "vitest";
import { readAhead } from "../src/jobs/read-ahead.ts";

/** A source that logs when each read starts and ends, and whether it was closed. */
function source(items: number[], failAt?: number) {
  const log: string[] = [];
  async function* gen() {
    try {
      for (const [i, item] of items.entries()) {
        log.push(`read ${item}`);
        await new Promise((r) => setTimeout(r, 5));
        if (i === failAt) throw new Error(`source failed at ${item}`);
        yield item;
      }
    } finally {
      log.push("closed");
    }
  }
  return { log, gen: gen() };
}

describe("readAhead", () => {
  it("starts the next read before the consumer is done with the current item", async () => {
    const { log, gen } = source([1, 2, 3]);
    const seen: number[] = [];
    for await (const item of readAhead(gen)) {
      log.push(`use ${item}`);
      await new Promise((r) => setTimeout(r, 10));
      seen.push(item);
    }
    expect(seen).toEqual([1, 2, 3]);
    // Each read starts before the item ahead of it is used.
    expect(log).toEqual(["read 1", "read 2", "use 1", "read 3", "use 2", "closed", "use 3"]);
  });

  it("stopping early closes the source after the read in flight, which is dropped", async () => {
    const { log, gen } = source([1, 2, 3, 4]);
    for await (const item of readAhead(gen)) {
      if (item === 2) break;
    }
    expect(log).toEqual(["read 1", "read 2", "read 3", "closed"]);
  });

  it("a failing read surfaces in order, after the items before it", async () => {
    const { gen } = source([1, 2, 3], 1);
    const seen: number[] = [];
    await expect((async () => {
      for await (const item of readAhead(gen)) seen.push(item);
    })()).rejects.toThrow("source failed at 2");
    expect(seen).toEqual([1]);
  });
});
