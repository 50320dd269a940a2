// What tasks need from the process that runs them, set once by startWorker.
export interface JobContext {
  /** Opens connector credentials (snapbase_private.account_credentials); unsealed at start. */
  credentialsSecretKey: Buffer;
  /** The owner's connection string: the `managed` connector reads this database with it. */
  ownerUrl: string;
}

let context: JobContext | undefined;

export function setJobContext(c: JobContext): void {
  context = c;
}

export function jobContext(): JobContext {
  if (!context) throw new Error("tasks that talk to sources need the worker started by startWorker()");
  return context;
}
