/**
 * The benchmark's figures, computed from what one bootstrap run leaves on
 * the host (state.json's last run: per-step start, end, duration and deps;
 * the JSON-lines log) and what the bench sampled from the outside (bytes the
 * artifact server sent over time, bootstrap.py's memory). Pure functions, so
 * the math is unit-tested without a host.
 */

export interface StepTiming {
  name: string;
  deps: string[];
  /** Seconds since the engine's run started. */
  start_s: number;
  end_s: number;
  duration_s: number;
  /** changed | unchanged | failed | blocked */
  outcome: string;
}

export interface EngineRun {
  run_id: string;
  ok: boolean;
  status: string;
  /** The engine's own wall time (bootstrap.py's run, not the stub around it). */
  wall_s: number;
  jobs: number;
  steps: StepTiming[];
}

/** The last run recorded in `<bootstrap_dir>/state.json`. */
export function engineRunFromState(state: unknown): EngineRun {
  const run = (state as { last_run?: Record<string, unknown> } | null)?.last_run;
  if (!run || typeof run !== "object") throw new Error("state.json has no last_run");
  const rawSteps = (run.steps ?? {}) as Record<string, Record<string, unknown>>;
  const steps: StepTiming[] = Object.entries(rawSteps).map(([name, s]) => ({
    name,
    deps: Array.isArray(s.deps) ? (s.deps as string[]) : [],
    start_s: num(s.start_s),
    end_s: num(s.end_s),
    duration_s: num(s.duration_s),
    outcome: String(s.outcome ?? "?"),
  }));
  steps.sort((a, b) => a.start_s - b.start_s || a.name.localeCompare(b.name));
  const lastEnd = Math.max(0, ...steps.map((s) => s.end_s));
  return {
    run_id: String(run.run_id ?? ""),
    ok: run.ok === true,
    status: String(run.status ?? "?"),
    wall_s: typeof run.wall_s === "number" ? run.wall_s : lastEnd,
    jobs: num(run.jobs),
    steps,
  };
}

function num(v: unknown): number {
  return typeof v === "number" && Number.isFinite(v) ? v : 0;
}

/**
 * The chain of dependent steps with the largest total duration: the
 * shortest wall time any scheduler could reach with these step durations.
 * Dependencies outside the recorded steps are ignored.
 */
export function criticalPath(steps: readonly StepTiming[]): { path: string[]; seconds: number } {
  const byName = new Map(steps.map((s) => [s.name, s]));
  const memo = new Map<string, { seconds: number; path: string[] }>();
  const visiting = new Set<string>();
  const longest = (name: string): { seconds: number; path: string[] } => {
    const hit = memo.get(name);
    if (hit) return hit;
    if (visiting.has(name)) throw new Error(`dependency cycle through ${name}`);
    visiting.add(name);
    const step = byName.get(name)!;
    let best = { seconds: 0, path: [] as string[] };
    for (const d of step.deps) {
      if (!byName.has(d)) continue;
      const c = longest(d);
      if (c.seconds > best.seconds || (c.seconds === best.seconds && best.path.length === 0)) best = c;
    }
    const out = { seconds: best.seconds + step.duration_s, path: [...best.path, name] };
    visiting.delete(name);
    memo.set(name, out);
    return out;
  };
  let top = { seconds: 0, path: [] as string[] };
  for (const s of steps) {
    const c = longest(s.name);
    if (c.seconds > top.seconds) top = c;
  }
  return top;
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
