/**
 * The benchmark's runs, against the Testbed API: the reference workload
 * published by the testbed's artifact server (shared bandwidth limit,
 * first-byte latency), the testbed's hub on PGlite, a fresh throwaway host
 * per cold run, the hub's real stub run inside it as root.
 *
 * One iteration = a cold run with `parallel: true` on a fresh host, a warm
 * re-run there (nothing to do), a re-run after only the project bundle's
 * version changed (re-provisioned: the hub's config now names the new
 * version), then a cold run with `parallel: false` on another fresh host.
 * Iterations interleave the kinds, so slow phases of the machine hit all of
 * them alike.
 */
import { chmodSync, copyFileSync, mkdirSync } from "node:fs";
import { type BundleName, publishSite } from "../src/artifacts.js";
import { newestRunEvents } from "../src/end-state.js";
import { ThrowawayHost } from "../src/host.js";
import { hostsDir } from "../src/paths.js";
import { type BootstrapRun, type ProvisionedTestHost, TEST_APT_PACKAGES, Testbed, testHostRecord, testSecrets } from "../src/testbed.js";
import {
  aptCommands,
  type ByteSample,
  changedSteps,
  criticalPath,
  downloadThroughput,
  type EngineRun,
  type Extraction,
  engineOverheadSeconds,
  engineRunFromEvents,
  extractionRate,
  extractions,
  type LogRecord,
  logRecords,
  type Milestones,
  milestones,
  type StepTiming,
  type Throughput,
} from "./metrics.js";
import { ByteSampler, type MachineNoise, MemorySampler, probeMachine } from "./samplers.js";
import { asVersion, BASE_VERSION, buildWorkloadBundle, type WorkloadBundle, workloadSpecs } from "./workload.js";

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

export const RUN_KINDS = ["cold_parallel", "cold_serial", "warm", "version_change"] as const;
export type RunKind = (typeof RUN_KINDS)[number];

export interface BenchOptions {
  runs: number;
  scale: number;
  /** MB/s (10^6 bytes) shared by all downloads from the artifact server; 0 = unlimited. */
  bandwidthMBps: number;
  latencyMs: number;
  aptPackages: string[];
  kinds: RunKind[];
  log: (line: string) => void;
  /** Per bootstrap run. */
  timeoutMs?: number;
  /**
   * Copy this machine's xz into each fresh host before the run, as Ubuntu
   * cloud images ship it (the testbed's Debian minbase does not, so bundles
   * extracted before apt installed xz-utils use Python's lzma).
   */
  xzAtStart?: boolean;
}

export interface RunRecord {
  kind: RunKind;
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
  /** engine_wall_s ÷ critical_path_s: 1.0 is a perfect scheduler. */
  wall_over_critical: number | null;
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
  noise: MachineNoise;
  /** Output tail when the run failed. */
  failure?: string;
}

export interface WorkloadInfo {
  scale: number;
  bundles: { artifact: BundleName; version: string; size_bytes: number; content_bytes: number; files: number; ratio: number; sha256: string }[];
  node: { version: string; size_bytes: number };
  apt_packages: string[];
}

export interface BenchRun {
  workload: WorkloadInfo;
  runs: RunRecord[];
  started_at: string;
  finished_at: string;
}

export async function runBench(opts: BenchOptions): Promise<BenchRun> {
  const log = opts.log;
  const started_at = new Date().toISOString();
  if (!opts.kinds.includes("cold_parallel") && (opts.kinds.includes("warm") || opts.kinds.includes("version_change"))) {
    throw new Error("warm and version_change re-run the cold_parallel host: include cold_parallel");
  }
  const bundles: WorkloadBundle[] = [];
  for (const spec of workloadSpecs(opts.scale)) bundles.push(await buildWorkloadBundle(spec, log));
  const bed = await Testbed.start({
    log,
    aptPackages: opts.aptPackages,
    bandwidthBytesPerSec: opts.bandwidthMBps > 0 ? opts.bandwidthMBps * 1e6 : undefined,
    latencyMs: opts.latencyMs || undefined,
  });
  const workload: WorkloadInfo = {
    scale: opts.scale,
    bundles: bundles.map((b) => ({
      artifact: b.spec.artifact,
      version: b.spec.version,
      size_bytes: b.size_bytes,
      content_bytes: b.contentBytes,
      files: b.files,
      ratio: b.contentBytes / b.size_bytes,
      sha256: b.sha256,
    })),
    node: { version: bed.node.spec.version, size_bytes: bed.node.size_bytes },
    apt_packages: opts.aptPackages,
  };
  const runs: RunRecord[] = [];
  const ctx: RunContext = { bed, bundles, opts, archiveBytes: Object.fromEntries(bundles.map((b) => [b.spec.artifact, b.size_bytes])) };
  checkLayout(bed, bundles);
  try {
    for (let i = 1; i <= opts.runs; i++) {
      log(`--- iteration ${i}/${opts.runs}`);
      if (opts.kinds.includes("cold_parallel")) runs.push(...(await parallelHostRuns(ctx, i)));
      if (opts.kinds.includes("cold_serial")) runs.push(...(await serialHostRun(ctx, i)));
    }
  } finally {
    await bed.close();
  }
  return { workload, runs, started_at, finished_at: new Date().toISOString() };
}

interface RunContext {
  bed: Testbed;
  bundles: WorkloadBundle[];
  opts: BenchOptions;
  archiveBytes: Record<string, number>;
}

/** The hub's site settings carry the testbed's bundle layout; ours must be the same. */
function checkLayout(bed: Testbed, bundles: WorkloadBundle[]): void {
  for (const b of bundles) {
    const theirs = bed.site.bundles[b.spec.artifact];
    const same = JSON.stringify([theirs.expected_files, theirs.executables]) === JSON.stringify([b.expectedFiles, b.executables]);
    if (!same) throw new Error(`bench bundle ${b.spec.artifact} no longer matches the testbed's layout ${JSON.stringify(theirs)}`);
  }
}

/** Point the testbed's site at the bench bundles (the project bundle at `projectVersion`). */
function publish(ctx: RunContext, projectVersion = BASE_VERSION): void {
  const site = ctx.bed.site;
  const list = ctx.bundles.map((b) => (b.spec.artifact === "project" && projectVersion !== BASE_VERSION ? asVersion(b, projectVersion) : b));
  publishSite(site.dir, site.baseUrl, list, ctx.bed.node);
}

async function withHost<T>(ctx: RunContext, fn: (host: ThrowawayHost) => Promise<T>): Promise<T> {
  const host = await ThrowawayHost.up({ log: ctx.opts.log });
  try {
    if (ctx.opts.xzAtStart) {
      // Same Debian release as the host; liblzma5 is there (dpkg needs it).
      copyFileSync("/usr/bin/xz", host.path("/usr/bin/xz"));
      chmodSync(host.path("/usr/bin/xz"), 0o755);
    }
    return await fn(host);
  } finally {
    await host.down();
  }
}

async function parallelHostRuns(ctx: RunContext, iteration: number): Promise<RunRecord[]> {
  return withHost(ctx, async (host) => {
    const out: RunRecord[] = [];
    publish(ctx);
    const p = await ctx.bed.provision(host);
    out.push(await measure(ctx, "cold_parallel", iteration, host, p));
    if (ctx.opts.kinds.includes("warm")) out.push(await measure(ctx, "warm", iteration, host, p));
    if (ctx.opts.kinds.includes("version_change")) {
      publish(ctx, `1.0.${iteration}`);
      // Re-register the same host: the hub assembles its config from the new manifests.
      const again = await p.hub.provisionHost({ ...testHostRecord(host, new URL(p.healthUrl).origin), id: p.hostId }, { secrets: testSecrets() });
      out.push(await measure(ctx, "version_change", iteration, host, { ...p, token: again.token, stub: again.stub, config: again.config }));
    }
    return out;
  });
}

async function serialHostRun(ctx: RunContext, iteration: number): Promise<RunRecord[]> {
  return withHost(ctx, async (host) => {
    publish(ctx);
    const p = await ctx.bed.provision(host, { parallel: false });
    return [await measure(ctx, "cold_serial", iteration, host, p)];
  });
}

async function measure(ctx: RunContext, kind: RunKind, iteration: number, host: ThrowawayHost, p: ProvisionedTestHost): Promise<RunRecord> {
  const { bed, opts } = ctx;
  mkdirSync(hostsDir(), { recursive: true });
  const noise = probeMachine(hostsDir());
  const bytes = new ByteSampler(bed.artifactServer.requests);
  const memory = new MemorySampler(host.rootfs);
  opts.log(`${kind} #${iteration} on ${host.name} (load ${noise.loadavg_1m.toFixed(1)}) ...`);
  bytes.start();
  memory.start();
  let result: BootstrapRun;
  let peakKb: number | null;
  try {
    result = await bed.bootstrap(host, p, { timeoutMs: opts.timeoutMs });
  } finally {
    peakKb = memory.stop();
    bytes.stop();
  }
  if (result.code !== 0) {
    const tail = (result.stderr || result.stdout).split("\n").slice(-30).join("\n");
    throw new Error(`${kind} run #${iteration} on ${host.name} failed (exit ${result.code}):\n${tail}`);
  }
  const engine = readEngineRun(host, p.config.bootstrap_dir);
  const records = logRecords(readOr(host, `${p.config.bootstrap_root}/logs/bootstrap.log`), engine.run_id);
  const record = runRecord(kind, iteration, host.name, result, engine, records, {
    samples: bytes.samples,
    limit: opts.bandwidthMBps > 0 ? opts.bandwidthMBps * 1e6 : null,
    archiveBytes: ctx.archiveBytes,
    peakKb,
    noise,
  });
  opts.log(
    `${kind} #${iteration}: ${record.ok ? "ok" : "FAILED"} in ${record.wall_s.toFixed(1)} s` +
      ` (critical path ${record.critical_path_s.toFixed(1)} s, changed: ${record.changed_steps.join(" ") || "nothing"}` +
      `${record.service_restarted ? "; daemon restarted" : ""})`,
  );
  if (!record.ok) throw new Error(`${kind} run #${iteration} failed: ${engine.status}`);
  return record;
}

function readEngineRun(host: ThrowawayHost, bootstrapDir: string): EngineRun {
  return engineRunFromEvents(newestRunEvents(host, bootstrapDir));
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
  return {
    kind,
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
    noise: seen.noise,
    ...(ok ? {} : { failure: (result.stderr || result.stdout).split("\n").slice(-30).join("\n") }),
  };
}

export function defaultAptPackages(smoke: boolean): string[] {
  return smoke ? [...TEST_APT_PACKAGES] : [...REAL_APT_PACKAGES];
}
