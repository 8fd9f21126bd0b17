#!/usr/bin/env node
/** Entry point of `pnpm bench` (scripts/bench.sh runs it with tsx). */
import { resolve } from "node:path";
import { bench } from "./main.js";

async function main(): Promise<number> {
  const repoRoot = resolve(new URL("../../../..", import.meta.url).pathname);
  try {
    const out = await bench(process.argv.slice(2), { repoRoot });
    if (out) {
      process.stdout.write(`${out.markdown}\n`);
      process.stderr.write(`bench: results in ${out.dir}\n`);
    }
    return 0;
  } catch (e) {
    process.stderr.write(`bench: error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    return 1;
  }
}

process.exit(await main());
