/**
 * The benchmark's figures, computed from what one bootstrap run leaves on
 * the host (its progress events in `<bootstrap_dir>/events/<run_id>.jsonl`:
 * per-step start, end, duration and deps; the JSON-lines log for command
 * details) and what the bench sampled from the outside (bytes the artifact
 * server sent over time, bootstrap.py's memory). Pure functions, so the math
 * is unit-tested without a host. The critical path is the package's one
 * definition (src/timings.ts, shared vectors with bootstrap.py).
 */
import { criticalPath, runTimings, type StepTiming } from "@cocalc/project-host-bootstrap";

export { criticalPath, type StepTiming };

export interface EngineRun {
  run_id: string;
  ok: boolean;
  /** done | failed | interrupted (no run_end: killed or still running) */
  status: string;
  /** The engine's own wall time (bootstrap.py's run, not the stub around it). */
  wall_s: number;
  parallel: boolean;
  /** Sorted by start. */
  steps: StepTiming[];
}

/** One run from the lines of its event spool (`<bootstrap_dir>/events/<run_id>.jsonl`). */
export function engineRunFromEvents(lines: readonly string[]): EngineRun {
  const run = runTimings(lines);
  const steps = [...run.steps].sort((a, b) => a.start_s - b.start_s || a.name.localeCompare(b.name));
  return {
    run_id: run.run_id,
    ok: run.ok === true,
    status: run.ok === null ? "interrupted" : run.ok ? "done" : "failed",
    wall_s: run.wall_s,
    parallel: run.parallel,
    steps,
  };
}

export interface Interval {
  start: number;
  end: number;
}

/** Total length of the union of the intervals (overlaps counted once). */
export function unionSeconds(intervals: readonly Interval[]): number {
  const sorted = intervals.filter((i) => i.end > i.start).sort((a, b) => a.start - b.start);
  let total = 0;
  let curStart = -Infinity;
  let curEnd = -Infinity;
  for (const i of sorted) {
    if (i.start > curEnd) {
      if (curEnd > curStart) total += curEnd - curStart;
      curStart = i.start;
      curEnd = i.end;
    } else if (i.end > curEnd) {
      curEnd = i.end;
    }
  }
  if (curEnd > curStart) total += curEnd - curStart;
  return total;
}

/** The engine's own overhead: wall time during which no step was running. */
export function engineOverheadSeconds(run: EngineRun): number {
  const covered = unionSeconds(run.steps.map((s) => ({ start: Math.max(0, s.start_s), end: Math.min(run.wall_s, s.end_s) })));
  return Math.max(0, run.wall_s - covered);
}

/** When (seconds since the engine started) the named steps had all finished; null when none ran. */
export function finishedBy(run: EngineRun, match: (name: string) => boolean): number | null {
  const ends = run.steps.filter((s) => match(s.name)).map((s) => s.end_s);
  return ends.length ? Math.max(...ends) : null;
}

export interface Milestones {
  downloads_s: number | null;
  apt_s: number | null;
  node_s: number | null;
}

export function milestones(run: EngineRun): Milestones {
  return {
    downloads_s: finishedBy(run, (n) => n.startsWith("download_")),
    apt_s: finishedBy(run, (n) => n === "apt"),
    node_s: finishedBy(run, (n) => n === "node"),
  };
}

/** Steps that did work in this run (the rest were skipped as unchanged). */
export function changedSteps(run: EngineRun): string[] {
  return run.steps.filter((s) => s.outcome === "changed").map((s) => s.name);
}

// --- downloads, sampled at the artifact server ------------------------------------------

export interface ByteSample {
  /** ms, any monotonic clock. */
  t_ms: number;
  /** Cumulative bytes the server has sent for this run. */
  bytes: number;
}

export interface Throughput {
  bytes: number;
  /** From the first sample that saw bytes move to the first that saw the final count. */
  window_s: number;
  bytes_per_s: number;
  /** bytes_per_s ÷ the configured limit; null without a limit. */
  fraction_of_limit: number | null;
}

/**
 * Link utilisation during the download phase. The window starts at the last
 * sample before bytes first moved and ends at the first sample that shows
 * the final count, so it can only overstate the window by one sample
 * period at each end (and understate throughput, never flatter it).
 */
export function downloadThroughput(samples: readonly ByteSample[], limitBytesPerSec: number | null): Throughput | null {
  if (samples.length < 2) return null;
  const base = samples[0]!.bytes;
  const final = samples[samples.length - 1]!.bytes;
  const bytes = final - base;
  if (bytes <= 0) return null;
  const firstMove = samples.findIndex((s) => s.bytes > base);
  const startT = samples[Math.max(0, firstMove - 1)]!.t_ms;
  const endT = samples.find((s) => s.bytes >= final)!.t_ms;
  const window_s = Math.max(1e-3, (endT - startT) / 1000);
  const bytes_per_s = bytes / window_s;
  return { bytes, window_s, bytes_per_s, fraction_of_limit: limitBytesPerSec ? bytes_per_s / limitBytesPerSec : null };
}

// --- the log --------------------------------------------------------------------------

export interface LogRecord {
  ts?: string;
  run_id?: string;
  step?: string | null;
  event?: string;
  message?: string;
  duration_s?: number;
  argv?: string[];
  [key: string]: unknown;
}

/** The JSON-lines log's records of one run (lines that do not parse are skipped). */
export function logRecords(text: string, runId: string): LogRecord[] {
  const out: LogRecord[] = [];
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    try {
      const r = JSON.parse(line) as LogRecord;
      if (r.run_id === runId) out.push(r);
    } catch {
      // a line cut by a kill; not ours to judge here
    }
  }
  return out;
}

export interface Extraction {
  artifact: string;
  archive_bytes: number;
  seconds: number;
  mb_per_s: number;
}

/**
 * How fast each bundle was extracted: archive size ÷ the extraction time the
 * install step logs ("installed <artifact> <version> in <s>s"), or the step's
 * whole duration when it does not say.
 */
export function extractions(run: EngineRun, records: readonly LogRecord[], archiveBytes: Record<string, number>): Extraction[] {
  const out: Extraction[] = [];
  for (const [artifact, bytes] of Object.entries(archiveBytes)) {
    const step = run.steps.find((s) => s.name === `install_${artifact}`);
    if (step?.outcome !== "changed") continue;
    const said = records.map((r) => new RegExp(`^installed ${artifact} \\S+ in ([\\d.]+)s`).exec(r.message ?? "")).find((m) => m !== null);
    const seconds = said ? Number(said[1]) : step.duration_s;
    if (!(seconds > 0)) continue;
    out.push({ artifact, archive_bytes: bytes, seconds, mb_per_s: bytes / 1e6 / seconds });
  }
  return out;
}

/** Archive MB ÷ seconds spent extracting, over all bundles extracted in the run. */
export function extractionRate(list: readonly Extraction[]): number | null {
  const seconds = list.reduce((a, e) => a + e.seconds, 0);
  const bytes = list.reduce((a, e) => a + e.archive_bytes, 0);
  return seconds > 0 ? bytes / 1e6 / seconds : null;
}

/** Durations of the apt commands of the run (update, install), from the command records. */
export function aptCommands(records: readonly LogRecord[]): { update_s: number | null; install_s: number | null } {
  const sum = (verb: string) => {
    const hits = records.filter((r) => r.event === "command" && (r.argv ?? []).includes("apt-get") && (r.argv ?? []).includes(verb));
    return hits.length ? hits.reduce((a, r) => a + (r.duration_s ?? 0), 0) : null;
  };
  return { update_s: sum("update"), install_s: sum("install") };
}

// --- statistics -------------------------------------------------------------------------

export interface Stat {
  median: number;
  min: number;
  max: number;
  n: number;
  /** (max − min) ÷ median: the spread the machine put on this figure. */
  spread: number;
}

export function stat(values: readonly (number | null | undefined)[]): Stat | null {
  const xs = values.filter((v): v is number => typeof v === "number" && Number.isFinite(v)).sort((a, b) => a - b);
  if (xs.length === 0) return null;
  const mid = xs.length >> 1;
  const median = xs.length % 2 ? xs[mid]! : (xs[mid - 1]! + xs[mid]!) / 2;
  const min = xs[0]!;
  const max = xs[xs.length - 1]!;
  return { median, min, max, n: xs.length, spread: median !== 0 ? (max - min) / Math.abs(median) : 0 };
}

// --- CPU-seconds per step (the step_end events' `cpu`) -----------------------------------

export interface StepCpuSeconds {
  user_s: number;
  sys_s: number;
  children_user_s: number;
  children_sys_s: number;
}

/** Each step's CPU-seconds from a run's event lines (steps without a measurement are left out). */
export function stepCpu(lines: readonly string[]): Record<string, StepCpuSeconds> {
  const out: Record<string, StepCpuSeconds> = {};
  for (const line of lines) {
    let e: { type?: string; step?: string; cpu?: StepCpuSeconds | null };
    try {
      e = JSON.parse(line);
    } catch {
      break; // a torn last line
    }
    if (e.type === "step_end" && typeof e.step === "string" && e.cpu) out[e.step] = e.cpu;
  }
  return out;
}

export function cpuTotal(c: StepCpuSeconds): number {
  return c.user_s + c.sys_s + c.children_user_s + c.children_sys_s;
}

// --- isolated costs and the resource lower bound -----------------------------------------

/** One heavy piece measured alone (the legacy host runs each command by itself). */
export interface Piece {
  name: string;
  /** apt, node, a bundle's name, or image_<bundle> */
  group: string;
  wall_s: number;
  user_s: number;
  sys_s: number;
  bytes: number | null;
}

/** A stage of a chain: one or more pieces that run at once (xz and tar in a pipe share one wall time). */
export interface Stage {
  name: string;
  wall_s: number;
  cpu_s: number;
}

/** `.tar.xz` archives, `.tar.zst` archives (same tar content), squashfs images. */
export type Format = "archive" | "archive-zst" | "image";

/**
 * The dependency chains of a run's heavy work, as isolated stages: apt
 * (update → install); per bundle download → verify → install (archive:
 * decompress | write, one pipe, xz or zstd; image: mount); Node download → verify →
 * install. Chains do not depend on each other. `bundles` are the bundles
 * the run installs (all for a cold run, the changed one for an upgrade);
 * `withBase` adds apt and Node (a cold run); `apt` picks whose apt work:
 * the legacy flow's (with recommends) or bootstrap.py's measured alone.
 */
export function chains(pieces: readonly Piece[], format: Format, bundles: readonly string[], withBase: boolean, apt: "legacy" | "new" = "legacy"): Stage[][] {
  const by = new Map(pieces.map((p) => [p.name, p]));
  const stage = (name: string, ...names: string[]): Stage | null => {
    const ps = names.map((n) => by.get(n)).filter((p): p is Piece => p !== undefined);
    if (ps.length !== names.length) return null;
    return { name, wall_s: Math.max(...ps.map((p) => p.wall_s)), cpu_s: ps.reduce((a, p) => a + p.user_s + p.sys_s, 0) };
  };
  const chain = (...stages: (Stage | null)[]): Stage[] => {
    if (stages.some((s) => s === null)) throw new Error(`isolated costs lack a piece of ${stages.map((s) => s?.name ?? "?").join(" → ")}`);
    return stages as Stage[];
  };
  const out: Stage[][] = [];
  if (withBase) {
    // `new`: bootstrap.py's apt measured alone (new_apt_*: no recommends); `legacy`: the old flow's
    const p = apt === "new" ? "new_" : "";
    out.push(chain(stage("apt_update", `${p}apt_update`), stage("apt_install", `${p}apt_install`)));
    const sums = by.has("download_node_sums") ? ["download_node_sums"] : [];
    out.push(
      chain(stage("download_node", "download_node", ...sums), stage("verify_node", "verify_node"), stage("install_node", "decompress_node", "write_node")),
    );
  }
  for (const a of bundles) {
    if (format === "archive") {
      out.push(chain(stage(`download_${a}`, `download_${a}`), stage(`verify_${a}`, `verify_${a}`), stage(`install_${a}`, `decompress_${a}`, `write_${a}`)));
    } else if (format === "archive-zst") {
      out.push(
        chain(
          stage(`download_${a}`, `zst_download_${a}`),
          stage(`verify_${a}`, `zst_verify_${a}`),
          stage(`install_${a}`, `zst_decompress_${a}`, `zst_write_${a}`),
        ),
      );
    } else {
      out.push(chain(stage(`download_${a}`, `image_download_${a}`), stage(`verify_${a}`, `image_verify_${a}`), stage(`install_${a}`, `image_mount_${a}`)));
    }
  }
  return out;
}

/** A piece that moves bytes over the block's link (its wall time cannot beat bytes ÷ bandwidth). */
export function isDownload(p: Pick<Piece, "name">): boolean {
  return /(^|_)download_/.test(p.name);
}

/**
 * The isolated costs of a block from its iterations' measurements: per piece,
 * the minimum wall time and, separately, the minimum CPU-seconds (user and
 * system as that measurement split them) over the iterations that measured
 * it. Contention only ever adds time, so the least contended measurement of
 * each is the best estimate of its cost alone.
 */
export function minimumPieces(iterations: readonly (readonly Piece[])[]): Piece[] {
  const out = new Map<string, Piece>();
  for (const pieces of iterations) {
    for (const p of pieces) {
      const seen = out.get(p.name);
      if (!seen) {
        out.set(p.name, { ...p });
        continue;
      }
      const cpu = p.user_s + p.sys_s < seen.user_s + seen.sys_s ? { user_s: p.user_s, sys_s: p.sys_s } : {};
      out.set(p.name, { ...seen, ...cpu, wall_s: Math.min(seen.wall_s, p.wall_s), bytes: seen.bytes ?? p.bytes });
    }
  }
  return [...out.values()];
}

/**
 * The artifact server's token bucket holds a tenth of a second's worth of
 * bytes: a download can beat bytes ÷ bandwidth by that burst, not more.
 */
export const BUCKET_BURST_S = 0.1;

/**
 * Each download piece's wall time floored at bytes ÷ bandwidth (a download
 * cannot be faster than the link), and a warning for every measurement that
 * was faster than the link allows even with the bucket's burst (then the
 * measurement is wrong: a cache, a wrong size, a clock). No limit: unchanged.
 */
export function floorDownloads(pieces: readonly Piece[], bandwidthBytesPerSec: number | null): { pieces: Piece[]; warnings: string[] } {
  const warnings: string[] = [];
  if (!(bandwidthBytesPerSec && bandwidthBytesPerSec > 0)) return { pieces: pieces.map((p) => ({ ...p })), warnings };
  const out = pieces.map((p) => {
    if (!isDownload(p) || p.bytes === null || !(p.bytes > 0)) return { ...p };
    const floor = p.bytes / bandwidthBytesPerSec;
    if (p.wall_s < floor - BUCKET_BURST_S) {
      warnings.push(
        `${p.name}: ${p.wall_s.toFixed(2)} s for ${(p.bytes / 1e6).toFixed(1)} MB is faster than the link allows ` +
          `(${floor.toFixed(2)} s at ${(bandwidthBytesPerSec / 1e6).toFixed(0)} MB/s): measurement suspect, floored`,
      );
    }
    return { ...p, wall_s: Math.max(p.wall_s, floor) };
  });
  return { pieces: out, warnings };
}

export interface LowerBound {
  /** max(bandwidth_s, chain_s, cpu_bound_s); 0 when there is no work. */
  seconds: number;
  /** Which term sets it. */
  binding: "bandwidth" | "chain" | "cpu" | "none";
  /** bytes ÷ bandwidth (0 without a limit). */
  bandwidth_s: number;
  bytes: number;
  /** The longest chain of isolated wall times, and its stages. */
  chain_s: number;
  chain: string[];
  /** Σ isolated CPU-seconds of every stage, and that ÷ cores. */
  cpu_s: number;
  cpu_bound_s: number;
  cores: number;
}

/**
 * The resource lower bound of a run: no schedule can beat the link
 * (bytes ÷ bandwidth), the longest dependency chain of isolated costs, or
 * the CPU (total isolated CPU-seconds ÷ cores).
 */
export function lowerBound(stages: readonly Stage[][], bytes: number, bandwidthBytesPerSec: number | null, cores: number): LowerBound {
  if (!(cores >= 1)) throw new Error(`cores must be >= 1, got ${cores}`);
  const bandwidth_s = bandwidthBytesPerSec && bandwidthBytesPerSec > 0 ? bytes / bandwidthBytesPerSec : 0;
  let chain_s = 0;
  let chain: string[] = [];
  for (const c of stages) {
    const s = c.reduce((a, x) => a + x.wall_s, 0);
    if (s > chain_s) {
      chain_s = s;
      chain = c.map((x) => x.name);
    }
  }
  const cpu_s = stages.flat().reduce((a, x) => a + x.cpu_s, 0);
  const cpu_bound_s = cpu_s / cores;
  const seconds = Math.max(bandwidth_s, chain_s, cpu_bound_s);
  const binding = seconds <= 0 ? "none" : seconds === bandwidth_s ? "bandwidth" : seconds === chain_s ? "chain" : "cpu";
  return { seconds, binding, bandwidth_s, bytes, chain_s, chain, cpu_s, cpu_bound_s, cores };
}

/** wall ÷ lower bound; null when the bound is 0 (nothing to do: a warm re-run). */
export function overBound(wall_s: number, lb: LowerBound | null): number | null {
  return lb && lb.seconds > 0 ? wall_s / lb.seconds : null;
}

// --- machine noise: /proc/stat and the host's processes ----------------------------------

/** The aggregate `cpu` line of /proc/stat, in clock ticks. */
export interface CpuTicks {
  busy: number;
  total: number;
}

/** busy = user + nice + system + irq + softirq + steal; total adds idle and iowait (guest time is inside user). */
export function parseProcStat(text: string): CpuTicks {
  const line = text.split("\n").find((l) => /^cpu\s/.test(l));
  if (!line) throw new Error("/proc/stat has no aggregate cpu line");
  const f = line.trim().split(/\s+/).slice(1).map(Number);
  const [user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0] = f;
  const busy = user + nice + system + irq + softirq + steal;
  return { busy, total: busy + idle + iowait };
}

/** utime + stime + cutime + cstime of one /proc/<pid>/stat line, in clock ticks (the name may hold spaces and parentheses). */
export function procStatTicks(text: string): number {
  const rest = text
    .slice(text.lastIndexOf(")") + 2)
    .trim()
    .split(/\s+/);
  // rest[0] is field 3 (state); utime is field 14 → rest[11]
  const f = (i: number) => Number(rest[i]) || 0;
  return f(11) + f(12) + f(13) + f(14);
}

export interface Noise {
  wall_s: number;
  /** CPU-seconds the whole machine spent during the run (all cores). */
  machine_cpu_s: number;
  /** CPU-seconds of the run itself: the bootstrap's process tree, the host's processes, the bench's own process (artifact server, hub). */
  ours_cpu_s: number;
  /** machine − ours (≥ 0): other work on the machine. */
  not_ours_cpu_s: number;
  /** not ours ÷ machine. */
  not_ours_fraction: number;
  /** machine CPU-seconds ÷ (wall × cores): how busy the cores were. */
  cores_busy: number;
}

export function noise(before: CpuTicks, after: CpuTicks, oursCpuS: number, wallS: number, cores: number, ticksPerSecond = 100): Noise {
  const machine = Math.max(0, after.busy - before.busy) / ticksPerSecond;
  const ours = Math.max(0, oursCpuS);
  const notOurs = Math.max(0, machine - ours);
  return {
    wall_s: wallS,
    machine_cpu_s: machine,
    ours_cpu_s: ours,
    not_ours_cpu_s: notOurs,
    not_ours_fraction: machine > 0 ? notOurs / machine : 0,
    cores_busy: wallS > 0 ? machine / (wallS * cores) : 0,
  };
}
