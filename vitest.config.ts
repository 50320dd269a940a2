import path from "node:path";
import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

const root = path.dirname(fileURLToPath(import.meta.url));

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // Migrates one template database per run; setup-file.ts gives each test file its
    // own copy of it (and keeps logs in memory), so files run in parallel.
    globalSetup: ["test/global-setup.ts"],
    setupFiles: ["src/env.ts", "test/setup-file.ts"],
    fileParallelism: true,
    // Files wait on PostgreSQL much of the time: a few more workers than cores keep them busy.
    maxWorkers: Number(process.env.TEST_WORKERS) || 3,
    // Each file runs in a fresh process: let them reuse V8's compiled code of the
    // dependencies (PostGraphile and friends) instead of compiling it again.
    env: { NODE_COMPILE_CACHE: process.env.NODE_COMPILE_CACHE ?? path.join(root, "node_modules", ".cache", "node-compile-cache") },
    testTimeout: 60_000,
    hookTimeout: 120_000,
    reporters: ["default"],
    // Only tests this slow are listed by name (parallel files on busy cores often take 300 ms).
    slowTestThreshold: 5_000,
  },
});
