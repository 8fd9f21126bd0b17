/**
 * `pnpm bench`: how fast a throwaway host comes up with the reference
 * workload, how close to the limits, and why. See --help.
 */
import { cpus, release } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { whyNotSupported } from "../src/machine.js";
import type { Format } from "./metrics.js";
import { type BenchSettings, buildResult, writeResults } from "./report.js";
import {
  APT_SOURCES,
  type AptSource,
  type BenchRun,
  type Block,
  buildZstArchives,
  DEFAULT_FORMATS,
  defaultAptPackages,
  FILE_SYSTEMS,
  FORMATS,
  type HostFs,
  RUN_KINDS,
  type RunKind,
  runBench,
} from "./runner.js";
import { buildWorkloadBundle, DEFAULT_ZSTD_LEVEL, workloadSpecs } from "./workload.js";

const HELP = `usage: pnpm bench [options]

Bootstraps throwaway hosts (Debian in systemd-nspawn; needs root) with the
reference workload and writes result.json, result.md (printed) and the cold
runs' waterfalls (SVG) into a results folder. Every bandwidth × host file
system is a block; each block runs the legacy reference (which also measures
the isolated costs) and, per format, cold parallel, warm, one-bundle upgrade
and cold serial runs.

  --runs N            runs of each kind per block; each figure is the median with min and max (default 3)
  --scale X           bundle size factor: 1 = project-host 100 MB, project 250 MB,
                      tools 50 MB of .tar.xz (default 1)
  --bandwidths LIST   MB/s limits shared by all downloads, 0 = none (default 50,200)
  --bandwidth MB/s    one bandwidth (same as --bandwidths MB/s)
  --fs LIST           where the hosts live: root (this machine's root fs), ext4 (a journaled
                      ext4 image each, on a loop device) (default root,ext4)
  --blocks LIST       explicit blocks instead of bandwidths × fs, e.g. 50:root,50:ext4,200:ext4
  --formats LIST      ${FORMATS.join(",")} (default: ${DEFAULT_FORMATS.join(",")});
                      archive-zst: the same tar content as .tar.zst (built once and cached)
  --image-level N     zstd level of the bundle images (default: the converter's, 19); a lower one
                      builds much faster and makes a slightly bigger image
  --zstd-level N      zstd level of the .tar.zst archives (default ${DEFAULT_ZSTD_LEVEL}; built with -T0)
  --latency MS        first-byte latency of every artifact response (default 0)
  --apt real|test     the old bootstrap's package list (default), or the tests' small one
  --kinds LIST        comma-separated subset of ${RUN_KINDS.join(",")} (default: all)
  --apt-source S      cache (default): the hosts' apt goes through a local caching proxy, paced by
                      the block's bandwidth with the artifacts (filled before anything is timed);
                      mirror: this machine's Debian mirror directly, not limited
  --xz-at-start       copy this machine's xz into each host first (Ubuntu images ship xz;
                      the testbed's Debian minbase does not)
  --smoke             quick check that the bench works: --runs 1 --scale 0.01 --apt test
                      --blocks 50:ext4 --kinds legacy,cold_parallel,warm,version_change
  --out DIR           results folder (default: results/bench-<timestamp> in the repository)
  -h, --help          this text`;

interface Cli {
  runs: number;
  scale: number;
  blocks: Block[];
  latency: number;
  apt: string[];
  kinds: RunKind[];
  formats: Format[];
  smoke: boolean;
  xzAtStart: boolean;
  aptSource: AptSource;
  imageLevel: number | undefined;
  zstdLevel: number;
  out: string;
}

export function parseCli(argv: string[], repoRoot: string, now = new Date()): Cli | "help" {
  const { values } = parseArgs({
    args: argv,
    options: {
      runs: { type: "string" },
      scale: { type: "string" },
      bandwidth: { type: "string" },
      bandwidths: { type: "string" },
      fs: { type: "string" },
      blocks: { type: "string" },
      formats: { type: "string" },
      latency: { type: "string" },
      apt: { type: "string" },
      kinds: { type: "string" },
      smoke: { type: "boolean", default: false },
      "xz-at-start": { type: "boolean", default: false },
      "apt-source": { type: "string" },
      "image-level": { type: "string" },
      "zstd-level": { type: "string" },
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
  const list = <T extends string>(name: string, text: string, known: readonly T[]): T[] => {
    const items = text
      .split(",")
      .map((k) => k.trim())
      .filter(Boolean);
    const unknown = items.filter((k) => !(known as readonly string[]).includes(k));
    if (unknown.length) throw new Error(`--${name}: unknown ${unknown.join(", ")} (known: ${known.join(", ")})`);
    if (items.length === 0) throw new Error(`--${name}: empty list`);
    return [...new Set(items)] as T[];
  };
  const kinds = list("kinds", values.kinds ?? (smoke ? "legacy,cold_parallel,warm,version_change" : RUN_KINDS.join(",")), RUN_KINDS);
  const formats = list("formats", values.formats ?? DEFAULT_FORMATS.join(","), FORMATS);
  const bandwidth = (text: string, name: string) => number(name, text, 0, (x) => x >= 0 && x <= 100_000);
  if (values.bandwidth !== undefined && values.bandwidths !== undefined) throw new Error("--bandwidth and --bandwidths: give one of them");
  let blocks: Block[];
  if (values.blocks !== undefined) {
    if (values.bandwidth !== undefined || values.bandwidths !== undefined || values.fs !== undefined) {
      throw new Error("--blocks: give it instead of --bandwidth(s) and --fs, not with them");
    }
    blocks = values.blocks
      .split(",")
      .map((b) => b.trim())
      .filter(Boolean)
      .map((b) => {
        const m = /^([0-9.]+):(\w+)$/.exec(b);
        if (!m || !(FILE_SYSTEMS as readonly string[]).includes(m[2]!))
          throw new Error(`--blocks: ${JSON.stringify(b)} is not MB/s:fs (fs: ${FILE_SYSTEMS.join(", ")})`);
        return { bandwidthMBps: bandwidth(m[1]!, "blocks"), fs: m[2] as HostFs };
      });
    if (blocks.length === 0) throw new Error("--blocks: empty list");
  } else {
    const bws = (values.bandwidths ?? values.bandwidth ?? (smoke ? "50" : "50,200")).split(",").map((b) => bandwidth(b.trim(), "bandwidths"));
    const fss = list("fs", values.fs ?? (smoke ? "ext4" : FILE_SYSTEMS.join(",")), FILE_SYSTEMS);
    blocks = bws.flatMap((bandwidthMBps) => fss.map((fs) => ({ bandwidthMBps, fs })));
  }
  const stamp = now
    .toISOString()
    .replace(/[-:]/g, "")
    .replace(/\.\d+Z$/, "Z");
  return {
    runs: number("runs", values.runs, smoke ? 1 : 3, (x) => Number.isInteger(x) && x >= 1 && x <= 50),
    scale: number("scale", values.scale, smoke ? 0.01 : 1, (x) => x > 0 && x <= 10),
    blocks,
    latency: number("latency", values.latency, 0, (x) => x >= 0 && x <= 60_000),
    apt: defaultAptPackages(apt === "test"),
    kinds,
    formats,
    smoke,
    xzAtStart: values["xz-at-start"] ?? false,
    aptSource: list("apt-source", values["apt-source"] ?? "cache", APT_SOURCES)[0]!,
    imageLevel:
      values["image-level"] === undefined ? undefined : number("image-level", values["image-level"], 19, (x) => Number.isInteger(x) && x >= 1 && x <= 22),
    zstdLevel: number("zstd-level", values["zstd-level"], DEFAULT_ZSTD_LEVEL, (x) => Number.isInteger(x) && x >= 1 && x <= 22),
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
  const settings: BenchSettings = {
    command: ["pnpm bench", ...argv].join(" "),
    runs: cli.runs,
    scale: cli.scale,
    smoke: cli.smoke,
    blocks: cli.blocks,
    formats: cli.formats,
    kinds: cli.kinds,
    latency_ms: cli.latency,
    xz_at_start: cli.xzAtStart,
    apt_source: cli.aptSource,
    image_level: cli.imageLevel ?? null,
    zstd_level: cli.formats.includes("archive-zst") ? cli.zstdLevel : null,
    machine: { cpus: cpus().length, kernel: release(), node: process.version },
  };
  // the .tar.zst archives, built (or found in the cache) before any host is up; their sizes go into the workload
  let zst: Awaited<ReturnType<typeof buildZstArchives>> | undefined;
  if (cli.formats.includes("archive-zst")) {
    const bundles = [];
    for (const spec of workloadSpecs(cli.scale)) bundles.push(await buildWorkloadBundle(spec, log));
    zst = await buildZstArchives(bundles, cli.zstdLevel, log);
  }
  const withZst = (r: BenchRun): BenchRun =>
    zst ? { ...r, workload: { ...r.workload, bundles: r.workload.bundles.map((b) => ({ ...b, zst_bytes: zst[b.artifact]?.size_bytes ?? null })) } } : r;
  const run = await runBench({
    runs: cli.runs,
    scale: cli.scale,
    blocks: cli.blocks,
    latencyMs: cli.latency,
    aptPackages: cli.apt,
    kinds: cli.kinds,
    formats: cli.formats,
    xzAtStart: cli.xzAtStart,
    aptSource: cli.aptSource,
    imageLevel: cli.imageLevel,
    zstdLevel: cli.zstdLevel,
    zstArchives: zst,
    log,
    // a partial results folder after every host's runs: a long run cut short still leaves its figures
    onIteration: (partial) => {
      writeResults(cli.out, buildResult(withZst(partial), { ...settings, partial: true }));
      log(`partial results in ${cli.out}`);
    },
  });

  const markdown = writeResults(cli.out, buildResult(withZst(run), settings));
  return { dir: cli.out, markdown };
}
