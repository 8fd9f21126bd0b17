/**
 * The zod side of the Python differential fuzzer (python/tests/test_config_fuzz.py):
 * reads one config per line (JSON text, as bootstrap.py would read it from a
 * file), answers one line: `{"ok": true, "config": ...}` or `{"ok": false,
 * "paths": [...]}` with checkConfig's error paths (formatPath), `["$"]` when
 * the text is not JSON at all (JSON.parse refuses it).
 *
 *   tsx scripts/zod-check-config.ts < configs.jsonl
 */
import { createInterface } from "node:readline";
import { checkConfig, formatPath } from "../src/config.js";

function verdict(line: string): unknown {
  let input: unknown;
  try {
    input = JSON.parse(line);
  } catch {
    return { ok: false, paths: ["$"] };
  }
  const r = checkConfig(input);
  return r.ok ? { ok: true, config: r.config } : { ok: false, paths: [...new Set(r.issues.map((i) => formatPath(i.path)))].sort() };
}

createInterface({ input: process.stdin, crlfDelay: Number.POSITIVE_INFINITY }).on("line", (line) => {
  process.stdout.write(`${JSON.stringify(verdict(line))}\n`);
});
