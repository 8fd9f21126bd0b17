/**
 * The benchmark's runs, against the Testbed API: the reference workload
 * published by the testbed's artifact server (shared bandwidth limit,
 * first-byte latency), the testbed's hub on PGlite, a fresh throwaway host
 * per cold run, the hub's real stub run inside it as root.
 *
 * A block = one bandwidth × one file system the hosts live on (this
 * machine's root fs, or a journaled ext4 image of their own). One iteration
 * of a block: every fresh host it needs is brought up first; then the
 * legacy reference run (the old serial flow, bench/legacy.py, which also
 * measures each heavy piece alone: the isolated costs), then per format
 * (.tar.xz archives, .tar.zst archives with --formats archive-zst, images)
 * a cold run with `parallel: true`, a warm re-run there (nothing to do), a
 * re-run after only the project bundle's version changed, and a cold run
 * with `parallel: false` on another fresh host. The bounds rest on each
 * piece's minimum over the block's iterations. A host is
 * parked (stopped, loop devices released) after its runs and deleted only
 * when the iteration is over, so no teardown lands right before a timed run.
 * Iterations interleave the kinds, so slow phases of the machine hit all of
 * them alike.
 */
import { chmodSync, copyFileSync, mkdirSync, readFileSync, symlinkSync } from "node:fs";
import { cpus } from "node:os";
import { join } from "node:path";
import { BOOTSTRAP_PY_PATH } from "@cocalc/project-host-bootstrap";
import { type AptCache, startAptCache } from "../src/apt-cache.js";
import { TokenBucket } from "../src/artifact-server.js";
import { type BuiltFile, type BundleName, buildBundleImage, dashName, publishSite } from "../src/artifacts.js";
import { newestRunEvents } from "../src/end-state.js";
import { PowerCutDisk } from "../src/faults/power.js";
import { ThrowawayHost } from "../src/host.js";
import { cacheDir, hostsDir } from "../src/paths.js";
import { run as runProc } from "../src/proc.js";
import { type ProvisionedTestHost, TEST_APT_PACKAGES, Testbed, testHostRecord, testSecrets } from "../src/testbed.js";
import {
  aptCommands,
  type ByteSample,
  chains,
  changedSteps,
  cpuTotal,
  criticalPath,
  downloadThroughput,
  type EngineRun,
  type Extraction,
  engineOverheadSeconds,
  engineRunFromEvents,
  extractionRate,
  extractions,
  type Format,
  floorDownloads,
  type LogRecord,
  type LowerBound,
  logRecords,
  lowerBound,
  type Milestones,
  milestones,
  minimumPieces,
  type Noise,
  overBound,
  type Piece,
  type StepCpuSeconds,
  type StepTiming,
  stepCpu,
  type Throughput,
} from "./metrics.js";
import { ByteSampler, CpuAccount, type MachineNoise, MemorySampler, probeMachine } from "./samplers.js";
import { asVersion, BASE_VERSION, buildWorkloadBundle, buildWorkloadZst, DEFAULT_ZSTD_LEVEL, type WorkloadBundle, workloadSpecs } from "./workload.js";

/** The apt list of the old bootstrap (what a real project host installs). */
export const REAL_APT_PACKAGES = [
  "podman",
  "btrfs-progs",
  "uidmap",
  "slirp4netns",
  "passt",
  "fuse-overlayfs",
  "curl",
  "xz-utils",
  "rsync",
  "vim",
  "crun",
  "cron",
  "chrony",
];

export const RUN_KINDS = ["legacy", "cold_parallel", "cold_serial", "warm", "version_change"] as const;
export type RunKind = (typeof RUN_KINDS)[number];
export const FORMATS: readonly Format[] = ["archive", "archive-zst", "image"];
/** What `--formats` runs unless told: the `.tar.xz` archives and the images. */
export const DEFAULT_FORMATS: readonly Format[] = ["archive", "image"];
export const FILE_SYSTEMS = ["root", "ext4"] as const;
/** Where the hosts live: this machine's root file system, or a journaled ext4 image each (on a loop device). */
export type HostFs = (typeof FILE_SYSTEMS)[number];

/** One bandwidth × one host file system: the runs that share isolated costs. */
export interface Block {
  bandwidthMBps: number;
  fs: HostFs;
}

export interface BenchOptions {
  runs: number;
  scale: number;
  /** Bandwidth (MB/s, 10^6 bytes, shared by all downloads; 0 = unlimited) × host file system, in this order. */
  blocks: Block[];
  latencyMs: number;
  aptPackages: string[];
  kinds: RunKind[];
  formats: Format[];
  log: (line: string) => void;
  /** Per bootstrap run. */
  timeoutMs?: number;
  /**
   * Copy this machine's xz into each fresh host before the run, as Ubuntu
   * cloud images ship it (the testbed's Debian minbase does not, so bundles
   * extracted before apt installed xz-utils use Python's lzma).
   */
  xzAtStart?: boolean;
  /** zstd level of the bundle images (default: the converter's, 19, as a release would publish them). */
  imageLevel?: number;
  /**
   * Where the hosts' apt fetches from: `cache` (default) the local caching
   * proxy (src/apt-cache.ts), paced by the block's bandwidth with the
   * artifacts; `mirror` this machine's mirror directly, unlimited.
   */
  aptSource?: AptSource;
  /** zstd level of the `.tar.zst` archives of the archive-zst format (default 19). */
  zstdLevel?: number;
  /** The `.tar.zst` archives, when built beforehand (`buildZstArchives`); else built at the first archive-zst use. */
  zstArchives?: Partial<Record<BundleName, WorkloadBundle>>;
  /** Called with everything so far after each host's runs (the CLI writes the results folder each time). */
  onIteration?: (partial: BenchRun) => void;
}

export const APT_SOURCES = ["cache", "mirror"] as const;
export type AptSource = (typeof APT_SOURCES)[number];

export interface RunRecord {
  kind: RunKind;
  /** archive, archive-zst or image (the legacy run installs .tar.xz archives). */
  format: Format;
  bandwidth_mb_per_s: number;
  fs: HostFs;
  iteration: number;
  host: string;
  ok: boolean;
  exit_code: number;
  /** End to end: the stub, from start to exit, as cloud-init would see it. */
  wall_s: number;
  /** bootstrap.py's own run (its run_end event). */
  engine_wall_s: number;
  /** wall_s − engine_wall_s: the stub's downloads of bootstrap.py and the config, python start. */
  stub_overhead_s: number;
  critical_path_s: number;
  critical_path: string[];
  /** engine_wall_s ÷ critical_path_s: a diagnostic (the path is made of the same run's contended step times). */
  wall_over_critical: number | null;
  /**
   * The resource lower bound from the block's isolated costs: each piece's minimum over the block's iterations
   * (recomputed after every iteration; final at the end of the block). Null without a legacy run.
   */
  lower_bound: LowerBound | null;
  /** wall_s ÷ lower_bound.seconds. */
  wall_over_bound: number | null;
  /** The bound from this iteration's isolated costs alone (what a single measurement gives; kept to compare). */
  lower_bound_iteration: LowerBound | null;
  /** wall_s ÷ lower_bound_iteration.seconds. */
  wall_over_bound_iteration: number | null;
  /** Bytes apt downloaded in this run (through the block's link); null when unknown. Part of the bound's bytes term. */
  apt_bytes: number | null;
  /** Σ CPU-seconds the steps report (thread + reaped children); the legacy run: Σ of its commands. */
  steps_cpu_s: number | null;
  /** Machine CPU during the run: ours and not ours, cores busy. */
  cpu: Noise;
  engine_overhead_s: number;
  milestones: Milestones;
  apt_update_s: number | null;
  apt_install_s: number | null;
  download: Throughput | null;
  extractions: Extraction[];
  extraction_mb_per_s: number | null;
  peak_rss_mb: number | null;
  changed_steps: string[];
  /** The daemon was (re)started by this run (its unit, env file or bundle changed). */
  service_restarted: boolean;
  steps: StepTiming[];
  /** Each step's CPU-seconds, as its step_end event says. */
  step_cpu: Record<string, StepCpuSeconds>;
  noise: MachineNoise;
  /** Output tail when the run failed. */
  failure?: string;
}

/** The legacy host's measurements: its own wall time, and every piece alone. */
export interface IsolatedCosts {
  bandwidth_mb_per_s: number;
  fs: HostFs;
  iteration: number;
  legacy_wall_s: number;
  pieces: Piece[];
}

export interface WorkloadInfo {
  scale: number;
  bundles: {
    artifact: BundleName;
    version: string;
    size_bytes: number;
    content_bytes: number;
    files: number;
    ratio: number;
    sha256: string;
    image_bytes: number | null;
    /** The .tar.zst archive's size (archive-zst format), when built. */
    zst_bytes?: number | null;
  }[];
  node: { version: string; size_bytes: number };
  apt_packages: string[];
}

export interface BenchRun {
  workload: WorkloadInfo;
  runs: RunRecord[];
  isolated: IsolatedCosts[];
  cores: number;
  started_at: string;
  finished_at: string;
}

export async function runBench(opts: BenchOptions): Promise<BenchRun> {
  const aptCache = (opts.aptSource ?? "cache") === "cache" ? await startAptCache({ dir: join(cacheDir(), "apt-cache"), log: opts.log }) : null;
  try {
    return await runBlocks(opts, aptCache);
  } finally {
    await aptCache?.close();
  }
}

async function runBlocks(opts: BenchOptions, aptCache: AptCache | null): Promise<BenchRun> {
  const log = opts.log;
  const started_at = new Date().toISOString();
  if (!opts.kinds.includes("cold_parallel") && (opts.kinds.includes("warm") || opts.kinds.includes("version_change"))) {
    throw new Error("warm and version_change re-run the cold_parallel host: include cold_parallel");
  }
  if (opts.blocks.length === 0) throw new Error("no bandwidth × file system block to run");
  const cores = cpus().length;
  const bundles: WorkloadBundle[] = [];
  for (const spec of workloadSpecs(opts.scale)) bundles.push(await buildWorkloadBundle(spec, log));
  const images: Partial<Record<BundleName, BuiltFile>> = {};
  if (opts.formats.includes("image")) for (const b of bundles) images[b.spec.artifact] = await buildBundleImage(b, log, opts.imageLevel);
  const runs: RunRecord[] = [];
  const isolated: IsolatedCosts[] = [];
  let workload: WorkloadInfo | null = null;
  if (aptCache) await warmAptCache(aptCache, opts);
  for (const block of opts.blocks) {
    log(`=== ${block.bandwidthMBps > 0 ? `${block.bandwidthMBps} MB/s` : "unlimited bandwidth"}, hosts on ${fsLabel(block.fs)}`);
    // One link per block: the artifacts and (through the apt cache) apt share its bucket.
    const bucket = block.bandwidthMBps > 0 ? new TokenBucket(block.bandwidthMBps * 1e6) : null;
    aptCache?.setBucket(bucket);
    const bed = await Testbed.start({
      log,
      aptPackages: opts.aptPackages,
      ...(bucket ? { bucket } : {}),
      latencyMs: opts.latencyMs || undefined,
    });
    workload ??= {
      scale: opts.scale,
      bundles: bundles.map((b) => ({
        artifact: b.spec.artifact,
        version: b.spec.version,
        size_bytes: b.size_bytes,
        content_bytes: b.contentBytes,
        files: b.files,
        ratio: b.contentBytes / b.size_bytes,
        sha256: b.sha256,
        image_bytes: images[b.spec.artifact]?.size_bytes ?? null,
      })),
      node: { version: bed.node.spec.version, size_bytes: bed.node.size_bytes },
      apt_packages: opts.aptPackages,
    };
    const ctx: RunContext = {
      bed,
      bundles,
      images,
      opts,
      block,
      cores,
      aptCache,
      archiveBytes: Object.fromEntries(bundles.map((b) => [b.spec.artifact, b.size_bytes])),
    };
    checkLayout(bed, bundles);
    try {
      for (let i = 1; i <= opts.runs; i++) {
        log(`--- iteration ${i}/${opts.runs}`);
        const out = await iteration(ctx, i, (now, iso) => {
          const partial = { workload: workload!, runs: [...runs, ...now], isolated: [...isolated, ...(iso ? [iso] : [])], cores, started_at };
          opts.onIteration?.({ ...partial, finished_at: new Date().toISOString() });
        });
        runs.push(...out.runs);
        if (out.isolated) isolated.push(out.isolated);
      }
    } finally {
      await bed.close();
    }
  }
  return { workload: workload!, runs, isolated, cores, started_at, finished_at: new Date().toISOString() };
}

export function fsLabel(fs: HostFs): string {
  return fs === "root" ? "this machine's root fs" : "a journaled ext4 image";
}

interface RunContext {
  bed: Testbed;
  bundles: WorkloadBundle[];
  images: Partial<Record<BundleName, BuiltFile>>;
  opts: BenchOptions;
  block: Block;
  cores: number;
  archiveBytes: Record<string, number>;
  /** The local apt cache the hosts' apt goes through (null: the mirror directly). */
  aptCache: AptCache | null;
  /** The block's isolated costs and runs so far (attached by the first iteration of the block). */
  blockState?: { isolated: IsolatedCosts[]; runs: RunRecord[] };
}

/** The `.tar.zst` archives of the workload's bundles (built once, cached on disk beside the .tar.xz). */
export async function buildZstArchives(
  bundles: readonly WorkloadBundle[],
  level: number = DEFAULT_ZSTD_LEVEL,
  log: (line: string) => void = () => {},
): Promise<Partial<Record<BundleName, WorkloadBundle>>> {
  const out: Partial<Record<BundleName, WorkloadBundle>> = {};
  for (const b of bundles) out[b.spec.artifact] = await buildWorkloadZst(b, level, log);
  return out;
}

async function zstArchives(ctx: RunContext): Promise<Partial<Record<BundleName, WorkloadBundle>>> {
  ctx.opts.zstArchives ??= await buildZstArchives(ctx.bundles, ctx.opts.zstdLevel, ctx.opts.log);
  return ctx.opts.zstArchives;
}

function zstBytesOf(ctx: RunContext): Record<string, number> | undefined {
  const zst = ctx.opts.zstArchives;
  return zst ? Object.fromEntries(Object.entries(zst).map(([a, b]) => [a, b!.size_bytes])) : undefined;
}

/**
 * Copy this machine's zstd into a host (Ubuntu cloud images ship it; the testbed's Debian minbase does not, and
 * bootstrap.py needs the command for .tar.zst bundles: Python reads zstd only from 3.14 on).
 */
async function zstdIntoHost(host: ThrowawayHost): Promise<void> {
  copyFileSync("/usr/bin/zstd", host.path("/usr/bin/zstd"));
  chmodSync(host.path("/usr/bin/zstd"), 0o755);
  const r = await host.exec(["zstd", "--version"], { allowFailure: true });
  if (r.code !== 0) throw new Error(`this machine's zstd does not run in host ${host.name} (a library missing?): ${(r.stderr || r.stdout).trim()}`);
}

/** The hub's site settings carry the testbed's bundle layout; ours must be the same. */
function checkLayout(bed: Testbed, bundles: WorkloadBundle[]): void {
  for (const b of bundles) {
    const theirs = bed.site.bundles[b.spec.artifact];
    const same = JSON.stringify([theirs.expected_files, theirs.executables]) === JSON.stringify([b.expectedFiles, b.executables]);
    if (!same) throw new Error(`bench bundle ${b.spec.artifact} no longer matches the testbed's layout ${JSON.stringify(theirs)}`);
  }
}

/**
 * Point the testbed's site at the bench bundles (the project bundle at `projectVersion`): the `.tar.xz` archives,
 * the `.tar.zst` ones (published under the real bundles' `.tar.zst` names) or the archives with images.
 */
function publish(ctx: RunContext, format: Format, projectVersion = BASE_VERSION): void {
  const site = ctx.bed.site;
  const zst = ctx.opts.zstArchives;
  if (format === "archive-zst" && !zst) throw new Error("the .tar.zst archives are not built (zstArchives first)");
  const base = format === "archive-zst" ? ctx.bundles.map((b) => zst![b.spec.artifact]!) : ctx.bundles;
  const list = base.map((b) => (b.spec.artifact === "project" && projectVersion !== BASE_VERSION ? asVersion(b, projectVersion) : b));
  publishSite(site.dir, site.baseUrl, list, ctx.bed.node, format === "image" ? { images: ctx.images } : {});
}

/** A fresh host on the block's file system; `teardown` deletes it (and frees its disk image). */
interface BenchHost {
  host: ThrowawayHost;
  teardown: () => Promise<void>;
}

async function freshHost(ctx: RunContext): Promise<BenchHost> {
  const disk = ctx.block.fs === "ext4" ? new PowerCutDisk({ sizeGb: Math.max(8, Math.ceil(8 * ctx.opts.scale)), commitS: 5 }) : null;
  const host = await ThrowawayHost.up({ log: ctx.opts.log, ...(disk ? { prepareRootfs: disk.prepare } : {}) });
  if (ctx.opts.xzAtStart) {
    // Same Debian release as the host; liblzma5 is there (dpkg needs it).
    copyFileSync("/usr/bin/xz", host.path("/usr/bin/xz"));
    chmodSync(host.path("/usr/bin/xz"), 0o755);
  }
  if (ctx.aptCache) pointAptAtCache(host, ctx.aptCache);
  return {
    host,
    teardown: async () => {
      await host.down();
      await disk?.detach();
    },
  };
}

const APT_CACHE_CONF = "/etc/apt/apt.conf.d/00cocalc-bench-apt-cache";

function pointAptAtCache(host: ThrowawayHost, cache: AptCache): void {
  host.writeFile(APT_CACHE_CONF, cache.aptConf(), { mode: 0o644, owner: "root" });
}

/**
 * Fill the apt cache before anything is timed: on a throwaway host, unlimited,
 * the indexes as apt-get update fetches them by default and as bootstrap.py
 * asks for them (gz), and every package of the list with its recommends (the
 * legacy flow installs them; bootstrap.py's no-recommends set is a subset).
 * Pool files stay cached across invocations, so later warm-ups only refresh
 * the indexes.
 */
async function warmAptCache(cache: AptCache, opts: BenchOptions): Promise<void> {
  const t0 = Date.now();
  cache.setBucket(null);
  const before = { ...cache.stats };
  const host = await ThrowawayHost.up({ log: opts.log });
  try {
    pointAptAtCache(host, cache);
    const apt = ["apt-get", "-q", "-o", "Acquire::Retries=3"];
    await host.exec([...apt, "update"], { timeoutMs: 10 * 60_000 });
    await host.exec([...apt, "-o", "Acquire::CompressionTypes::Order::=gz", "update"], { timeoutMs: 10 * 60_000 });
    await host.exec([...apt, "install", "-y", "--download-only", ...opts.aptPackages], { timeoutMs: 20 * 60_000 });
  } finally {
    await host.down();
  }
  const s = cache.stats;
  opts.log(
    `apt cache warmed in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${s.requests - before.requests} requests, ` +
      `${s.misses - before.misses} fetched from the mirror, ${((s.bytesServed - before.bytesServed) / 1e6).toFixed(1)} MB served`,
  );
}

/**
 * One iteration of a block: all fresh hosts up first, then the timed runs
 * (each host parked after its runs), then every host deleted and the disk
 * given a moment (sync) before the next block or iteration brings up hosts.
 */
async function iteration(
  ctx: RunContext,
  i: number,
  progress: (runs: RunRecord[], isolated: IsolatedCosts | null) => void,
): Promise<{ runs: RunRecord[]; isolated: IsolatedCosts | null }> {
  const { opts } = ctx;
  // legacy first (its isolated costs bound the others), the serial runs last (a run cut short keeps the rest)
  const wanted: { kind: "legacy" | "apt_alone" | "cold_parallel" | "cold_serial"; format: Format }[] = [];
  if (opts.kinds.includes("legacy")) {
    wanted.push({ kind: "legacy", format: "archive" });
    // bootstrap.py's own apt work alone (no recommends): the isolated cost of the new runs' apt chain
    wanted.push({ kind: "apt_alone", format: "archive" });
  }
  for (const kind of ["cold_parallel", "cold_serial"] as const) {
    if (opts.kinds.includes(kind)) for (const format of opts.formats) wanted.push({ kind, format });
  }
  const hosts: BenchHost[] = [];
  const runs: RunRecord[] = [];
  let isolated: IsolatedCosts | null = null;
  ctx.blockState ??= { isolated: [], runs: [] };
  const block = ctx.blockState;
  const zst = opts.formats.includes("archive-zst");
  if (zst) await zstArchives(ctx);
  // Every run of the block so far is bounded again from the minima over the block's iterations so far
  // (at the block's last iteration: over all of them); each keeps its own iteration's bound beside it.
  const rebound = () =>
    reboundBlock([...block.runs, ...runs], [...block.isolated, ...(isolated ? [isolated] : [])], {
      ...ctx,
      nodeBytes: ctx.bed.node.size_bytes,
      zstBytes: zstBytesOf(ctx),
    });
  try {
    for (let n = 0; n < wanted.length; n++) hosts.push(await freshHost(ctx));
    // the archive-zst hosts need zstd before the bootstrap, the legacy host to measure the .tar.zst pieces
    if (zst) for (const [n, w] of wanted.entries()) if (w.kind === "legacy" || w.format === "archive-zst") await zstdIntoHost(hosts[n]!.host);
    await runProc(["sync"]);
    for (const [n, w] of wanted.entries()) {
      const { host } = hosts[n]!;
      if (w.kind === "legacy") {
        const out = await legacyRun(ctx, i, host);
        isolated = out.isolated;
        runs.push(out.record);
      } else if (w.kind === "apt_alone") {
        const pieces = await aptAloneRun(ctx, i, host);
        if (isolated) isolated.pieces.push(...pieces);
      } else if (w.kind === "cold_parallel") {
        runs.push(...(await parallelHostRuns(ctx, i, host, w.format)));
      } else {
        runs.push(...(await serialHostRun(ctx, i, host, w.format)));
      }
      await host.park();
      rebound();
      progress(runs, isolated);
    }
    rebound();
    block.runs.push(...runs);
    if (isolated) block.isolated.push(isolated);
  } finally {
    for (const h of hosts) await h.teardown().catch((e) => opts.log(`teardown: ${e instanceof Error ? e.message : String(e)}`));
    await runProc(["sync"], { allowFailure: true });
  }
  return { runs, isolated };
}

export type BoundContext = Pick<RunContext, "block" | "cores" | "archiveBytes" | "images"> & {
  nodeBytes: number;
  /** Sizes of the .tar.zst archives (the archive-zst format), by bundle. */
  zstBytes?: Record<string, number>;
};

/**
 * The bound of one kind of run: what it has to download and install, from the isolated costs (each download
 * piece's wall floored at bytes ÷ bandwidth). `aptBytes`: what apt downloaded in that run through the same link
 * (0 when unknown); it adds to the bytes term (apt's CPU and wall are in its chain already).
 */
export function boundFor(ctx: BoundContext, kind: RunKind, format: Format, pieces: readonly Piece[], aptBytes = 0): LowerBound {
  if (!(aptBytes >= 0)) throw new Error(`aptBytes must be >= 0, got ${aptBytes}`);
  const bw = ctx.block.bandwidthMBps > 0 ? ctx.block.bandwidthMBps * 1e6 : null;
  const floored = floorDownloads(pieces, bw).pieces;
  const bytesOf = (a: string) => {
    if (format === "image") return ctx.images[a as BundleName]?.size_bytes ?? 0;
    if (format === "archive-zst") {
      const z = ctx.zstBytes?.[a];
      if (z === undefined) throw new Error(`no .tar.zst size for ${a}: the archive-zst bound needs the zst archives`);
      return z;
    }
    return ctx.archiveBytes[a] ?? 0;
  };
  const all = Object.keys(ctx.archiveBytes);
  if (kind === "warm") return lowerBound([], aptBytes, bw, ctx.cores);
  if (kind === "version_change") return lowerBound(chains(floored, format, ["project"], false), bytesOf("project") + aptBytes, bw, ctx.cores);
  // the new runs' apt is bootstrap.py's (no recommends) when it was measured alone; the legacy run's its own
  const apt = kind !== "legacy" && floored.some((p) => p.name === "new_apt_install") ? "new" : "legacy";
  const bytes = all.reduce((a, b) => a + bytesOf(b), 0) + ctx.nodeBytes + aptBytes;
  return lowerBound(chains(floored, format, all, true, apt), bytes, bw, ctx.cores);
}

/**
 * Bound every run of a block from the minima of its isolated costs over the given iterations (`lower_bound`), and
 * from its own iteration's costs alone (`lower_bound_iteration`); both with the run's apt bytes. Runs without
 * isolated costs (no legacy run) keep null bounds.
 */
export function reboundBlock(runs: readonly RunRecord[], isolated: readonly IsolatedCosts[], ctx: BoundContext): void {
  const min = isolated.length ? minimumPieces(isolated.map((x) => x.pieces)) : null;
  for (const r of runs) {
    const own = isolated.find((x) => x.iteration === r.iteration);
    const apt = r.apt_bytes ?? 0;
    r.lower_bound = min ? boundFor(ctx, r.kind, r.format, min, apt) : null;
    r.wall_over_bound = overBound(r.wall_s, r.lower_bound);
    r.lower_bound_iteration = own ? boundFor(ctx, r.kind, r.format, own.pieces, apt) : null;
    r.wall_over_bound_iteration = overBound(r.wall_s, r.lower_bound_iteration);
  }
}

async function parallelHostRuns(ctx: RunContext, iteration: number, host: ThrowawayHost, format: Format): Promise<RunRecord[]> {
  const out: RunRecord[] = [];
  publish(ctx, format);
  const p = await ctx.bed.provision(host);
  out.push(await measure(ctx, "cold_parallel", format, iteration, host, p));
  if (ctx.opts.kinds.includes("warm")) out.push(await measure(ctx, "warm", format, iteration, host, p));
  if (ctx.opts.kinds.includes("version_change")) {
    publish(ctx, format, `1.0.${iteration}`);
    // Re-register the same host: the hub assembles its config from the new manifests.
    const again = await p.hub.provisionHost({ ...testHostRecord(host, new URL(p.healthUrl).origin), id: p.hostId }, { secrets: testSecrets() });
    out.push(await measure(ctx, "version_change", format, iteration, host, { ...p, token: again.token, stub: again.stub, config: again.config }));
  }
  return out;
}

async function serialHostRun(ctx: RunContext, iteration: number, host: ThrowawayHost, format: Format): Promise<RunRecord[]> {
  publish(ctx, format);
  const p = await ctx.bed.provision(host, { parallel: false });
  return [await measure(ctx, "cold_serial", format, iteration, host, p)];
}

const LEGACY_SCRIPT = new URL("./legacy.py", import.meta.url);

/**
 * bootstrap.py's own apt work (`apt-get update`, `apt-get install
 * --no-install-recommends`, with its options) alone on a fresh host: the
 * pieces `new_apt_update` and `new_apt_install`, which the new runs' apt chain
 * uses (the legacy flow installs with recommends: more packages, a longer chain).
 */
async function aptAloneRun(ctx: RunContext, iteration: number, host: ThrowawayHost): Promise<Piece[]> {
  const { opts } = ctx;
  host.writeFile("/root/bootstrap-for-apt.py", readFileSync(BOOTSTRAP_PY_PATH, "utf8"), { mode: 0o600, owner: "root" });
  host.writeFile("/root/legacy.py", readFileSync(LEGACY_SCRIPT, "utf8"), { mode: 0o700, owner: "root" });
  const spec = { mode: "apt_alone", bootstrap_py: "/root/bootstrap-for-apt.py", apt_packages: opts.aptPackages };
  host.writeFile("/root/apt-alone-spec.json", JSON.stringify(spec), { mode: 0o600, owner: "root" });
  const r = await host.exec(["python3", "/root/legacy.py", "/root/apt-alone-spec.json"], { allowFailure: true, timeoutMs: 30 * 60_000 });
  if (r.code !== 0) throw new Error(`apt-alone run #${iteration} on ${host.name} failed (exit ${r.code}):\n${(r.stderr || r.stdout).slice(-3000)}`);
  const parsed = JSON.parse(r.stdout.trim().split("\n").pop()!) as { legacy_wall_s: number; pieces: Piece[] };
  opts.log(`apt alone #${iteration} (bootstrap.py's apt, no recommends): ${parsed.legacy_wall_s.toFixed(1)} s`);
  return parsed.pieces;
}

/**
 * The old serial flow on a fresh host (bench/legacy.py), with the same
 * workload from the same server at the same bandwidth; its commands' times
 * are the isolated costs. The images are measured after it, alone.
 */
async function legacyRun(ctx: RunContext, iteration: number, host: ThrowawayHost): Promise<{ record: RunRecord; isolated: IsolatedCosts }> {
  const { bed, opts, block } = ctx;
  publish(ctx, opts.formats.includes("image") ? "image" : "archive");
  if (opts.formats.includes("archive-zst")) {
    // the .tar.zst archives beside the .tar.xz ones, for the legacy host to measure alone
    for (const b of ctx.bundles) {
      const z = opts.zstArchives![b.spec.artifact]!;
      symlinkSync(z.path, join(bed.site.dir, dashName(b.spec.artifact), b.spec.version, z.fileName));
    }
  }
  const p = await bed.provision(host);
  const c = p.config;
  const nodeFile = `node-v${c.node.version}-linux-${bed.node.spec.arch}.tar.xz`;
  const nodeBase = `${c.node.dist_url.replace(/\/+$/, "")}/v${c.node.version}`;
  const spec = {
    work_dir: "/root/legacy",
    apt_packages: opts.aptPackages,
    bundles: ctx.bundles.map((b) => {
      const a = c.artifacts[b.spec.artifact];
      return { artifact: b.spec.artifact, url: a.url, sha256: b.sha256, dest: `/opt/legacy/${b.spec.artifact}`, strip: a.strip_components };
    }),
    node: { url: `${nodeBase}/${nodeFile}`, shasums_url: `${nodeBase}/SHASUMS256.txt`, file: nodeFile, dest: "/opt/legacy/node" },
    images: opts.formats.includes("image")
      ? ctx.bundles.map((b) => ({ artifact: b.spec.artifact, url: c.artifacts[b.spec.artifact].image!.url, sha256: ctx.images[b.spec.artifact]!.sha256 }))
      : [],
    // the .tar.zst archives: published beside the .tar.xz ones (same directory), measured after the legacy flow
    zst: opts.formats.includes("archive-zst")
      ? ctx.bundles.map((b) => {
          const z = opts.zstArchives![b.spec.artifact]!;
          const url = c.artifacts[b.spec.artifact].url.replace(/[^/]+$/, z.fileName);
          return {
            artifact: b.spec.artifact,
            url,
            sha256: z.sha256,
            dest: `/opt/legacy-zst/${b.spec.artifact}`,
            strip: c.artifacts[b.spec.artifact].strip_components,
          };
        })
      : [],
  };
  host.writeFile("/root/legacy-spec.json", JSON.stringify(spec), { mode: 0o600, owner: "root" });
  host.writeFile("/root/legacy.py", readFileSync(LEGACY_SCRIPT, "utf8"), { mode: 0o700, owner: "root" });
  mkdirSync(hostsDir(), { recursive: true });
  const probe = probeMachine(hostsDir());
  opts.log(`legacy #${iteration} on ${host.name} (load ${probe.loadavg_1m.toFixed(1)}) ...`);
  const bytes = new ByteSampler(bed.artifactServer.requests);
  const account = new CpuAccount(host.rootfs, ctx.cores);
  const aptBefore = ctx.aptCache?.stats.bytesServed ?? null;
  bytes.start();
  const t0 = Date.now();
  const r = await host.exec(["python3", "/root/legacy.py", "/root/legacy-spec.json"], { allowFailure: true, timeoutMs: 30 * 60_000 });
  const wallMs = Date.now() - t0;
  bytes.stop();
  const cpu = account.finish();
  if (r.code !== 0) throw new Error(`legacy run #${iteration} on ${host.name} failed (exit ${r.code}):\n${(r.stderr || r.stdout).slice(-3000)}`);
  const parsed = JSON.parse(r.stdout.trim().split("\n").pop()!) as { legacy_wall_s: number; pieces: Piece[] };
  const legacyPieces = parsed.pieces.filter((x) => !x.group.startsWith("image_") && !x.group.startsWith("zst_"));
  const record: RunRecord = {
    kind: "legacy",
    format: "archive",
    bandwidth_mb_per_s: block.bandwidthMBps,
    fs: block.fs,
    iteration,
    host: host.name,
    ok: true,
    exit_code: 0,
    // the legacy flow's own time (the images measured after it are not part of it)
    wall_s: parsed.legacy_wall_s,
    engine_wall_s: parsed.legacy_wall_s,
    stub_overhead_s: 0,
    critical_path_s: parsed.legacy_wall_s,
    critical_path: legacyPieces.map((x) => x.name),
    wall_over_critical: null,
    lower_bound: null,
    wall_over_bound: null,
    lower_bound_iteration: null,
    wall_over_bound_iteration: null,
    // what apt fetched through the cache during the run (runs are one at a time; null without the cache)
    apt_bytes: aptBefore === null ? null : ctx.aptCache!.stats.bytesServed - aptBefore,
    steps_cpu_s: legacyPieces.reduce((a, x) => a + x.user_s + x.sys_s, 0),
    cpu: { ...cpu, wall_s: wallMs / 1000 },
    engine_overhead_s: 0,
    milestones: { downloads_s: null, apt_s: null, node_s: null },
    apt_update_s: legacyPieces.find((x) => x.name === "apt_update")?.wall_s ?? null,
    apt_install_s: legacyPieces.find((x) => x.name === "apt_install")?.wall_s ?? null,
    download: null,
    extractions: [],
    extraction_mb_per_s: null,
    peak_rss_mb: null,
    changed_steps: [],
    service_restarted: false,
    steps: [],
    step_cpu: {},
    noise: probe,
  };
  opts.log(`legacy #${iteration}: ${parsed.legacy_wall_s.toFixed(1)} s (whole script with images ${(wallMs / 1000).toFixed(1)} s)`);
  return {
    record,
    isolated: { bandwidth_mb_per_s: block.bandwidthMBps, fs: block.fs, iteration, legacy_wall_s: parsed.legacy_wall_s, pieces: parsed.pieces },
  };
}

async function measure(ctx: RunContext, kind: RunKind, format: Format, iteration: number, host: ThrowawayHost, p: ProvisionedTestHost): Promise<RunRecord> {
  const { bed, opts } = ctx;
  mkdirSync(hostsDir(), { recursive: true });
  const noise = probeMachine(hostsDir());
  const bytes = new ByteSampler(bed.artifactServer.requests);
  const memory = new MemorySampler(host.rootfs);
  opts.log(`${format} ${kind} #${iteration} on ${host.name} (load ${noise.loadavg_1m.toFixed(1)}) ...`);
  const account = new CpuAccount(host.rootfs, ctx.cores);
  const aptBefore = ctx.aptCache?.stats.bytesServed ?? null;
  bytes.start();
  memory.start();
  let result: Awaited<ReturnType<Testbed["bootstrap"]>>;
  let peakKb: number | null;
  try {
    result = await bed.bootstrap(host, p, { timeoutMs: opts.timeoutMs });
  } finally {
    peakKb = memory.stop();
    bytes.stop();
  }
  const cpu = account.finish();
  if (result.code !== 0) {
    const tail = (result.stderr || result.stdout).split("\n").slice(-30).join("\n");
    throw new Error(`${format} ${kind} run #${iteration} on ${host.name} failed (exit ${result.code}):\n${tail}`);
  }
  const lines = newestRunEvents(host, p.config.bootstrap_dir);
  const engine = engineRunFromEvents(lines);
  const records = logRecords(readOr(host, `${p.config.bootstrap_root}/logs/bootstrap.log`), engine.run_id);
  const record = runRecord(kind, iteration, host.name, result, engine, records, {
    samples: bytes.samples,
    limit: ctx.block.bandwidthMBps > 0 ? ctx.block.bandwidthMBps * 1e6 : null,
    archiveBytes: ctx.archiveBytes,
    peakKb,
    noise,
    cpu,
    stepCpu: stepCpu(lines),
    format,
    block: ctx.block,
    // what apt fetched through the cache during the run (runs are one at a time; null without the cache)
    aptBytes: aptBefore === null ? null : ctx.aptCache!.stats.bytesServed - aptBefore,
  });
  opts.log(
    `${format} ${kind} #${iteration}: ${record.ok ? "ok" : "FAILED"} in ${record.wall_s.toFixed(1)} s` +
      ` (steps ${record.steps_cpu_s?.toFixed(1) ?? "?"} CPU-s; machine ${cpu.machine_cpu_s.toFixed(1)} CPU-s, not ours ${(cpu.not_ours_fraction * 100).toFixed(0)}%;` +
      ` changed: ${record.changed_steps.join(" ") || "nothing"}${record.service_restarted ? "; daemon restarted" : ""})`,
  );
  if (!record.ok) throw new Error(`${kind} run #${iteration} failed: ${engine.status}`);
  return record;
}

function readOr(host: ThrowawayHost, path: string): string {
  try {
    return host.readFile(path);
  } catch {
    return "";
  }
}

export interface Observed {
  samples: ByteSample[];
  limit: number | null;
  archiveBytes: Record<string, number>;
  peakKb: number | null;
  noise: MachineNoise;
  cpu: Noise;
  stepCpu: Record<string, StepCpuSeconds>;
  format: Format;
  block: Block;
  /** Bytes apt fetched through the apt cache during the run (null or absent: unknown). */
  aptBytes?: number | null;
}

/** One run's figures from the stub's exit, the engine's state and log, and the samplers. */
export function runRecord(
  kind: RunKind,
  iteration: number,
  hostName: string,
  result: { code: number; wallMs: number; stdout: string; stderr: string },
  engine: EngineRun,
  records: LogRecord[],
  seen: Observed,
): RunRecord {
  const cp = criticalPath(engine.steps);
  const ex = extractions(engine, records, seen.archiveBytes);
  const apt = aptCommands(records);
  const wall_s = result.wallMs / 1000;
  const ok = result.code === 0 && engine.ok;
  const measured = Object.values(seen.stepCpu);
  return {
    kind,
    format: seen.format,
    bandwidth_mb_per_s: seen.block.bandwidthMBps,
    fs: seen.block.fs,
    iteration,
    host: hostName,
    ok,
    exit_code: result.code,
    wall_s,
    engine_wall_s: engine.wall_s,
    stub_overhead_s: Math.max(0, wall_s - engine.wall_s),
    critical_path_s: cp.seconds,
    critical_path: cp.path,
    wall_over_critical: cp.seconds > 0 ? engine.wall_s / cp.seconds : null,
    lower_bound: null,
    wall_over_bound: null,
    lower_bound_iteration: null,
    wall_over_bound_iteration: null,
    apt_bytes: seen.aptBytes ?? null,
    steps_cpu_s: measured.length ? measured.reduce((a, c) => a + cpuTotal(c), 0) : null,
    cpu: seen.cpu,
    engine_overhead_s: engineOverheadSeconds(engine),
    milestones: milestones(engine),
    apt_update_s: apt.update_s,
    apt_install_s: apt.install_s,
    download: downloadThroughput(seen.samples, seen.limit),
    extractions: ex,
    extraction_mb_per_s: extractionRate(ex),
    peak_rss_mb: seen.peakKb === null ? null : seen.peakKb / 1024,
    changed_steps: changedSteps(engine),
    service_restarted: records.some((r) => r.step === "service" && /^\(re\)started /.test(r.message ?? "")),
    steps: engine.steps,
    step_cpu: seen.stepCpu,
    noise: seen.noise,
    ...(ok ? {} : { failure: (result.stderr || result.stdout).split("\n").slice(-30).join("\n") }),
  };
}

export function defaultAptPackages(smoke: boolean): string[] {
  return smoke ? [...TEST_APT_PACKAGES] : [...REAL_APT_PACKAGES];
}
