// Reading the next batch from a source while the current one is being written, so
// the source's database and ours work at the same time instead of taking turns.

/**
 * Yields what `source` yields, asking it for the next item as soon as the current
 * one is handed out (one item ahead: memory holds at most two). Stopping early
 * (break, return, an error in the loop) closes the source once any read in flight
 * has settled.
 */
export async function* readAhead<T>(source: AsyncIterable<T>): AsyncGenerator<T> {
  const iterator = source[Symbol.asyncIterator]();
  let next = iterator.next();
  let finished = false;
  try {
    for (;;) {
      const current = await next;
      if (current.done) {
        finished = true;
        return;
      }
      next = iterator.next();
      // A failed read-ahead is reported when its turn comes, not as an unhandled rejection.
      next.catch(() => {});
      yield current.value;
    }
  } finally {
    if (!finished) {
      await next.catch(() => {});
      await iterator.return?.();
    }
  }
}
