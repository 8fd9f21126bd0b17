/**
 * Differential fuzzing of the config contract: the same generated configs
 * (test/config-arbitraries.ts) go to zod (checkConfig) and to the shipped
 * bootstrap.py (check-config's own functions, in one long-running process),
 * and both must give the same verdict, the same error paths and, when valid,
 * the same parsed config; bootstrap.py must never fail internally. The first
 * few configs also go through the real CLI, which must print exactly what the
 * long-running process answered (and exit 0 or 2).
 *
 * Bounded for CI: FUZZ_RUNS (default 300) configs, a random seed printed on
 * failure with the shrunk counterexample (replay with FUZZ_SEED=<seed>, and
 * FUZZ_PATH=<path> to go straight to it). `pnpm fuzz` runs 20000.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { checkConfig, formatPath } from "../src/config.js";
import { document, url, validConfigs } from "./config-arbitraries.js";
import { type CheckConfigOutput, configText, PythonCheckConfig, runCheckConfigCli } from "./python-check-config.js";

const RUNS = Number(process.env.FUZZ_RUNS ?? 300);
const SEED = process.env.FUZZ_SEED === undefined ? Date.now() ^ (Math.random() * 0x7fffffff) : Number(process.env.FUZZ_SEED);
const PATH = process.env.FUZZ_PATH;
const CLI_SAMPLE = 8;
// Printed first, so that even a run that hangs or is killed can be replayed.
console.log(`config fuzz: FUZZ_SEED=${SEED} FUZZ_RUNS=${RUNS}`);

function params(runs: number): fc.Parameters<unknown> {
  return { numRuns: runs, seed: SEED, ...(PATH ? { path: PATH } : {}), endOnFailure: false, verbose: 1 };
}

const uniqueSorted = (xs: string[]) => [...new Set(xs)].sort();

/** What zod says about the JSON text (what the host would receive), in check-config's terms. */
function zodVerdict(text: string): { ok: boolean; paths: string[]; config?: unknown } {
  const r = checkConfig(JSON.parse(text));
  return r.ok
    ? { ok: true, paths: [], config: JSON.parse(JSON.stringify(r.config)) }
    : { ok: false, paths: uniqueSorted(r.issues.map((i) => formatPath(i.path))) };
}

function pythonVerdict(out: CheckConfigOutput): { ok: boolean; paths: string[]; config?: unknown } {
  if (out.crash) throw new Error(`bootstrap.py failed internally (check-config would exit 1):\n${out.crash}`);
  return out.ok ? { ok: true, paths: [], config: out.config } : { ok: false, paths: uniqueSorted((out.errors ?? []).map((e) => e.path)) };
}

describe(`differential fuzzing: zod and bootstrap.py agree (seed ${SEED}, ${RUNS} runs; replay with FUZZ_SEED=${SEED})`, () => {
  let python: PythonCheckConfig;
  let work: string;
  beforeAll(() => {
    python = new PythonCheckConfig();
    work = mkdtempSync(join(tmpdir(), "phb-fuzz-"));
  });
  afterAll(() => {
    python.close();
    rmSync(work, { recursive: true, force: true });
  });

  it("same verdict, error paths and parsed config for generated configs", async () => {
    let valid = 0;
    let sampled = 0;
    await fc.assert(
      fc.asyncProperty(document, async (doc) => {
        const text = configText(doc);
        const out = await python.check(text);
        const py = pythonVerdict(out);
        expect(py).toEqual(zodVerdict(text));
        if (py.ok) valid++;
        if (sampled < CLI_SAMPLE) {
          sampled++;
          const file = join(work, `sample-${sampled}.json`);
          writeFileSync(file, text);
          const cli = await runCheckConfigCli(file);
          expect(cli.exitCode, cli.stderr).toBe(py.ok ? 0 : 2);
          expect(cli.output).toEqual(out);
        }
      }),
      params(RUNS),
    );
    // The generator must reach both verdicts, or the property says little.
    expect(valid, "no generated config was valid").toBeGreaterThan(0);
    expect(valid, "every generated config was valid").toBeLessThan(RUNS);
  }, 600_000);

  it("the URL rule: same verdict for generated URLs, and every accepted URL means the same to WHATWG URL", async () => {
    const base = validConfigs[0]!;
    await fc.assert(
      fc.asyncProperty(url, async (u) => {
        const text = configText({ ...base, hub: { url: u, events_url: u, secrets_url: u } });
        const zod = zodVerdict(text);
        const py = pythonVerdict(await python.check(text));
        expect(py).toEqual(zod);
        if (zod.ok) {
          // Accepted: WHATWG URL reads the same scheme and host name, with no userinfo.
          const parsed = new URL(u);
          expect(["http:", "https:"]).toContain(parsed.protocol);
          expect(parsed.username + parsed.password).toBe("");
          const authority = u.replace(/^https?:\/\//, "").split(/[/?#]/)[0]!;
          const hostPart = authority.startsWith("[") ? authority.slice(0, authority.indexOf("]") + 1) : authority.split(":")[0]!;
          if (!hostPart.startsWith("[")) expect(parsed.hostname).toBe(hostPart.toLowerCase());
        }
      }),
      params(RUNS * 4),
    );
  }, 600_000);
});
