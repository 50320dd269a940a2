// Structured logs: one JSON object per line on stdout, so any collector can parse them.
// Connection strings and password parameters are masked in every message and field.
import { redactDeep, redactText } from "./redact.ts";

type Level = "debug" | "info" | "warn" | "error";
const order: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };
let threshold: number = order[(process.env.LOG_LEVEL as Level) ?? "info"] ?? order.info;

/** "silent": nothing at all (tests that inject faults, whose errors are expected). */
export function setLogLevel(level: Level | "silent"): void {
  threshold = level === "silent" ? Infinity : order[level];
}

function write(level: Level, msg: string, fields?: Record<string, unknown>): void {
  if (order[level] < threshold) return;
  const line = JSON.stringify({ time: new Date().toISOString(), level, msg: redactText(msg), ...(fields ? (redactDeep(fields) as Record<string, unknown>) : {}) });
  (level === "error" || level === "warn" ? process.stderr : process.stdout).write(line + "\n");
}

export const log = {
  debug: (msg: string, fields?: Record<string, unknown>) => write("debug", msg, fields),
  info: (msg: string, fields?: Record<string, unknown>) => write("info", msg, fields),
  warn: (msg: string, fields?: Record<string, unknown>) => write("warn", msg, fields),
  error: (msg: string, fields?: Record<string, unknown>) => write("error", msg, fields),
};
