/**
 * What a run's events say about its timing: the steps of one run folded
 * from its events (the benchmark reads them from the host's spool), and the
 * critical path.
 *
 * The critical path has one definition, shared with bootstrap.py's
 * `critical_path` (its `timings` command): both must pass the vectors in
 * fixtures/critical-path/ (test/timings.test.ts, python/tests/test_timings.py).
 */
import { type BootstrapEvent, BootstrapEventSchema } from "./events.js";

export interface StepDuration {
  name: string;
  deps: readonly string[];
  duration_s: number;
}

/**
 * The chain of dependent steps with the largest total duration: the
 * shortest wall time any scheduler could reach with these durations.
 * Dependencies not among `steps` are ignored; ties go to the step (and the
 * dependency) listed first; a cycle is an error.
 */
export function criticalPath(steps: readonly StepDuration[]): { path: string[]; seconds: number } {
  const byName = new Map(steps.map((s) => [s.name, s]));
  const memo = new Map<string, { seconds: number; path: string[] }>();
  const visiting = new Set<string>();
  const longest = (name: string): { seconds: number; path: string[] } => {
    const hit = memo.get(name);
    if (hit) return hit;
    if (visiting.has(name)) throw new Error(`dependency cycle through ${name}`);
    visiting.add(name);
    const step = byName.get(name)!;
    let best: { seconds: number; path: string[] } | null = null;
    for (const d of step.deps) {
      if (!byName.has(d)) continue;
      const c = longest(d);
      if (best === null || c.seconds > best.seconds) best = c;
    }
    const out = { seconds: (best?.seconds ?? 0) + step.duration_s, path: [...(best?.path ?? []), name] };
    visiting.delete(name);
    memo.set(name, out);
    return out;
  };
  let top: { seconds: number; path: string[] } | null = null;
  for (const s of byName.values()) {
    const c = longest(s.name);
    if (top === null || c.seconds > top.seconds) top = c;
  }
  return top ?? { path: [], seconds: 0 };
}

export interface StepTiming extends StepDuration {
  deps: string[];
  /** Seconds since the run started (its run_start event). */
  start_s: number;
  end_s: number;
  outcome: string;
}

export interface RunTimings {
  run_id: string;
  /** null while the run has no run_end (running, or killed). */
  ok: boolean | null;
  parallel: boolean;
  /** bootstrap.py's own wall time (run_end), or up to the last event. */
  wall_s: number;
  /** The steps that ended, in plan order. */
  steps: StepTiming[];
}

/**
 * One run from its events (a spool file's lines, parsed), as bootstrap.py's
 * `timings` folds them: the run_start event first; lines that do not fit
 * the contract are left out, reading stops at a torn line.
 */
export function runTimings(lines: readonly string[]): RunTimings {
  const events: BootstrapEvent[] = [];
  for (const line of lines) {
    if (!line.trim()) continue;
    let data: unknown;
    try {
      data = JSON.parse(line);
    } catch {
      break; // the torn last line of a killed run
    }
    const r = BootstrapEventSchema.safeParse(data);
    if (r.success) events.push(r.data);
  }
  const first = events[0];
  if (first?.type !== "run_start") throw new Error("no run_start event: not the spool of a run");
  const started = new Map<string, number>();
  const ended = new Map<string, StepTiming>();
  let last = first.ts;
  let end: Extract<BootstrapEvent, { type: "run_end" }> | null = null;
  const at = (ts: number) => Math.round((ts - first.ts) * 1000) / 1000;
  for (const e of events.slice(1)) {
    last = Math.max(last, e.ts);
    if (e.type === "step_start") started.set(e.step, at(e.ts));
    else if (e.type === "step_end") {
      const info = first.steps.find((s) => s.name === e.step);
      const end_s = at(e.ts);
      ended.set(e.step, {
        name: e.step,
        deps: info?.deps ?? [],
        start_s: started.get(e.step) ?? end_s - e.duration_s,
        end_s,
        duration_s: e.duration_s,
        outcome: e.outcome,
      });
    } else if (e.type === "run_end") end = e;
  }
  return {
    run_id: first.run_id,
    ok: end ? end.ok : null,
    parallel: first.parallel,
    wall_s: end ? end.wall_s : at(last),
    steps: first.steps.map((s) => ended.get(s.name)).filter((s): s is StepTiming => s !== undefined),
  };
}
