/**
 * `pnpm bench`: how fast a throwaway host comes up with the reference
 * workload, how close to the limits, and why. See --help.
 */
import { cpus, release } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { whyNotSupported } from "../src/machine.js";
import { type BenchSettings, buildResult, writeResults } from "./report.js";
import { defaultAptPackages, RUN_KINDS, type RunKind, runBench } from "./runner.js";

const HELP = `usage: pnpm bench [options]

Bootstraps throwaway hosts (Debian in systemd-nspawn; needs root) with the
reference workload and writes result.json, result.md (printed) and the cold
runs' waterfalls (SVG) into a results folder.

  --runs N          runs of each kind; each figure is the median with min and max (default 3)
  --scale X         bundle size factor: 1 = project-host 100 MB, project 250 MB,
                    tools 50 MB of .tar.xz (default 1)
  --bandwidth MB/s  artifact server limit shared by all downloads, 0 = none (default 50)
  --latency MS      first-byte latency of every artifact response (default 0)
  --apt real|test   the old bootstrap's package list (default), or the tests' small one
  --kinds LIST      comma-separated subset of ${RUN_KINDS.join(",")} (default: all)
  --xz-at-start     copy this machine's xz into each host first (Ubuntu images ship xz;
                    the testbed's Debian minbase does not)
  --smoke           quick check that the bench works: --runs 1 --scale 0.01 --apt test
  --out DIR         results folder (default: results/bench-<timestamp> in the repository)
  -h, --help        this text`;

interface Cli {
  runs: number;
  scale: number;
  bandwidth: number;
  latency: number;
  apt: string[];
  kinds: RunKind[];
  smoke: boolean;
  xzAtStart: boolean;
  out: string;
}

export function parseCli(argv: string[], repoRoot: string, now = new Date()): Cli | "help" {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: "string" },
      scale: { type: "string" },
      bandwidth: { type: "string" },
      latency: { type: "string" },
      apt: { type: "string" },
      kinds: { type: "string" },
      smoke: { type: "boolean", default: false },
      "xz-at-start": { type: "boolean", default: false },
      out: { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) return "help";
  const smoke = values.smoke ?? false;
  const number = (name: string, text: string | undefined, fallback: number, ok: (x: number) => boolean) => {
    if (text === undefined) return fallback;
    const x = Number(text);
    if (!Number.isFinite(x) || !ok(x)) throw new Error(`--${name}: bad value ${JSON.stringify(text)}`);
    return x;
  };
  const apt = values.apt ?? (smoke ? "test" : "real");
  if (apt !== "real" && apt !== "test") throw new Error(`--apt: real or test, not ${JSON.stringify(apt)}`);
  const kinds = (values.kinds ?? RUN_KINDS.join(","))
    .split(",")
    .map((k) => k.trim())
    .filter(Boolean);
  const unknown = kinds.filter((k) => !(RUN_KINDS as readonly string[]).includes(k));
  if (unknown.length) throw new Error(`--kinds: unknown ${unknown.join(", ")} (known: ${RUN_KINDS.join(", ")})`);
  const stamp = now
    .toISOString()
    .replace(/[-:]/g, "")
    .replace(/\.\d+Z$/, "Z");
  return {
    runs: number("runs", values.runs, smoke ? 1 : 3, (x) => Number.isInteger(x) && x >= 1 && x <= 50),
    scale: number("scale", values.scale, smoke ? 0.01 : 1, (x) => x > 0 && x <= 10),
    bandwidth: number("bandwidth", values.bandwidth, 50, (x) => x >= 0),
    latency: number("latency", values.latency, 0, (x) => x >= 0 && x <= 60_000),
    apt: defaultAptPackages(apt === "test"),
    kinds: kinds as RunKind[],
    smoke,
    xzAtStart: values["xz-at-start"] ?? false,
    out: resolve(values.out ?? join(repoRoot, "results", `bench-${smoke ? "smoke-" : ""}${stamp}`)),
  };
}

/** Run the bench as the CLI would; returns the results folder and the Markdown. */
export async function bench(argv: string[], opts: { repoRoot: string; log?: (line: string) => void }): Promise<{ dir: string; markdown: string } | null> {
  const cli = parseCli(argv, opts.repoRoot);
  if (cli === "help") {
    process.stdout.write(`${HELP}\n`);
    return null;
  }
  const why = whyNotSupported();
  if (why) throw new Error(`the benchmark needs throwaway hosts: ${why}`);
  const log = opts.log ?? ((line: string) => process.stderr.write(`bench: ${line}\n`));
  const run = await runBench({
    runs: cli.runs,
    scale: cli.scale,
    bandwidthMBps: cli.bandwidth,
    latencyMs: cli.latency,
    aptPackages: cli.apt,
    kinds: cli.kinds,
    xzAtStart: cli.xzAtStart,
    log,
  });
  const settings: BenchSettings = {
    command: ["pnpm bench", ...argv].join(" "),
    runs: cli.runs,
    scale: cli.scale,
    smoke: cli.smoke,
    bandwidth_mb_per_s: cli.bandwidth,
    latency_ms: cli.latency,
    xz_at_start: cli.xzAtStart,
    machine: { cpus: cpus().length, kernel: release(), node: process.version },
  };
  const markdown = writeResults(cli.out, buildResult(run, settings));
  return { dir: cli.out, markdown };
}
