// Structured logs: one JSON object per line, so any collector can parse them. Every
// component logs through here: the server, REST, the worker and its tasks, and
// graphile-migrate and graphile-worker (through graphileLogFactory below).
// Connection strings and password parameters are masked in every message and field.
import { redactDeep, redactText } from "./redact.ts";

type Level = "debug" | "info" | "warn" | "error";
const order: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };
let threshold: number = order[(process.env.LOG_LEVEL as Level) ?? "info"] ?? order.info;

/** "silent": nothing at all (tests that inject faults, whose errors are expected). */
export function setLogLevel(level: Level | "silent"): void {
  threshold = level === "silent" ? Infinity : order[level];
}

/** Where the lines go: by default stdout (warnings and errors to stderr). */
export type LogSink = (line: string, level: Level) => void;

const stdio: LogSink = (line, level) => (level === "error" || level === "warn" ? process.stderr : process.stdout).write(line + "\n");
let sink: LogSink = stdio;

/** Sends every line to `next` instead (tests keep them in memory); no argument: back to stdout. */
export function setLogSink(next: LogSink = stdio): void {
  sink = next;
}

function write(level: Level, msg: string, fields?: Record<string, unknown>): void {
  if (order[level] < threshold) return;
  sink(JSON.stringify({ time: new Date().toISOString(), level, msg: redactText(msg), ...(fields ? (redactDeep(fields) as Record<string, unknown>) : {}) }), level);
}

export const log = {
  debug: (msg: string, fields?: Record<string, unknown>) => write("debug", msg, fields),
  info: (msg: string, fields?: Record<string, unknown>) => write("info", msg, fields),
  warn: (msg: string, fields?: Record<string, unknown>) => write("warn", msg, fields),
  error: (msg: string, fields?: Record<string, unknown>) => write("error", msg, fields),
};

/** @graphile/logger's levels, as graphile-migrate and graphile-worker call them. */
type GraphileLevel = "error" | "warning" | "info" | "debug";
const graphileLevels: Record<GraphileLevel, Level> = { error: "error", warning: "warn", info: "info", debug: "debug" };

/**
 * A @graphile/logger log-function factory that writes our JSON lines, tagged with
 * the component and the scope graphile gives (worker id, task, job id…). Wrap it
 * in the library's own `Logger` class (each library bundles its own copy).
 * `minimum`: the lowest level kept (graphile-migrate narrates every step at info).
 */
export function graphileLogFactory(component: string, minimum: Level = "debug") {
  return (scope: Record<string, unknown> = {}) =>
    (level: string, message: string, meta?: Record<string, unknown>) => {
      const ours = graphileLevels[level as GraphileLevel] ?? "info";
      if (order[ours] < order[minimum]) return;
      const fields: Record<string, unknown> = { component };
      for (const [key, value] of Object.entries(scope)) if (value !== undefined && key !== "label") fields[key] = value;
      if (scope.label !== undefined) fields.scope = scope.label;
      if (meta?.error instanceof Error) fields.error = meta.error.message;
      write(ours, message, fields);
    };
}
