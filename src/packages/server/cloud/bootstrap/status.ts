/**
 * Derive a host's status from its stored events. Pure: the store reads, this
 * folds, so the same rules serve the status route, the stream and the tests.
 */
import type { BootstrapEvent } from "@cocalc/project-host-bootstrap";
import type { Queryable } from "./db.js";
import type { FailureInfo, HostStatus, RunState, StepStatus } from "./status-types.js";
import { listRunEvents, listRuns, type StoredEvent } from "./store.js";

export type { HostStatus, RunState, StepState, StepStatus } from "./status-types.js";

export const DEFAULT_STALE_AFTER_S = 120;

export interface DeriveOptions {
  hostId: string;
  runs?: number;
  now: Date;
  staleAfterS: number;
}

function emptyStatus(o: DeriveOptions): HostStatus {
  return {
    host_id: o.hostId,
    run_id: null,
    state: "pending",
    phase: "waiting for the host to start bootstrapping",
    percent: 0,
    eta_s: null,
    started_ts: null,
    ended_ts: null,
    wall_s: null,
    last_event_ts: null,
    last_received_at: null,
    silent_s: null,
    stale_after_s: o.staleAfterS,
    current_steps: [],
    steps: [],
    failure: null,
    version: null,
    parallel: null,
    events: 0,
    missing_seqs: 0,
    runs: o.runs ?? 0,
    generated_at: o.now.getTime() / 1000,
  };
}

function newStep(name: string, deps: string[] = [], weight = 1): StepStatus {
  return { name, deps, weight, state: "pending", started_ts: null, ended_ts: null, duration_s: null, message: "", hint: null };
}

class RunFold {
  readonly steps = new Map<string, StepStatus>();
  progress: { phase: string; percent: number; ts: number; seq: number } | null = null;
  lastStepEndSeq = -1;
  failure: FailureInfo | null = null;

  constructor(readonly s: HostStatus) {}

  step(name: string): StepStatus {
    let st = this.steps.get(name);
    if (!st) {
      st = newStep(name);
      this.steps.set(name, st);
    }
    return st;
  }

  apply(e: BootstrapEvent): void {
    const s = this.s;
    s.last_event_ts = Math.max(s.last_event_ts ?? e.ts, e.ts);
    switch (e.type) {
      case "run_start":
        s.started_ts = e.ts;
        s.version = e.version;
        s.parallel = e.parallel;
        for (const info of e.steps) {
          const st = this.step(info.name);
          st.deps = info.deps;
          st.weight = info.weight;
        }
        break;
      case "step_start": {
        const st = this.step(e.step);
        st.started_ts = e.ts;
        if (st.state === "pending") st.state = "running";
        break;
      }
      case "step_end": {
        const st = this.step(e.step);
        st.state = e.outcome;
        st.ended_ts = e.ts;
        st.duration_s = e.duration_s;
        st.started_ts ??= e.ts - e.duration_s;
        st.message = e.message;
        st.hint = e.hint;
        this.lastStepEndSeq = e.seq;
        if (e.outcome === "failed" && !this.failure) {
          this.failure = { step: e.step, message: e.message || null, hint: e.hint, log_tail: e.log_tail };
        }
        break;
      }
      case "progress":
        this.progress = { phase: e.phase, percent: e.percent, ts: e.ts, seq: e.seq };
        break;
      case "run_end":
        s.state = e.ok ? "done" : "failed";
        s.ended_ts = e.ts;
        s.wall_s = e.wall_s;
        if (!e.ok) {
          const stepFailure = this.failure?.step === e.failed_step ? this.failure : null;
          this.failure = {
            step: e.failed_step,
            message: stepFailure?.message ?? null,
            hint: e.hint ?? stepFailure?.hint ?? null,
            log_tail: e.log_tail ?? stepFailure?.log_tail ?? null,
          };
        }
        break;
    }
  }
}

function weightedPercent(steps: StepStatus[]): number {
  const total = steps.reduce((a, st) => a + st.weight, 0);
  if (total <= 0) return 0;
  const done = steps.filter((st) => st.ended_ts !== null).reduce((a, st) => a + st.weight, 0);
  return (100 * done) / total;
}

/**
 * bootstrap.py's own percent when it is the latest news; when steps ended
 * after it, the weighted share of ended steps if that is further along.
 */
function currentPercent(fold: RunFold, steps: StepStatus[]): number {
  const p = fold.progress;
  if (p && p.seq > fold.lastStepEndSeq) return p.percent;
  return Math.min(100, Math.max(p?.percent ?? 0, weightedPercent(steps)));
}

function etaSeconds(s: HostStatus): number | null {
  if (s.state !== "running" || s.started_ts === null || s.last_event_ts === null) return null;
  if (s.percent <= 0 || s.percent >= 100) return null;
  const elapsed = s.last_event_ts - s.started_ts;
  return Math.max(0, Math.round((elapsed * (100 - s.percent)) / s.percent));
}

function derivedPhase(s: HostStatus): string {
  if (s.state === "done") return "done";
  if (s.state === "failed") return `failed${s.failure?.step ? ` at ${s.failure.step}` : ""}`;
  if (s.current_steps.length > 0) return `running ${s.current_steps.join(", ")}`;
  return "starting";
}

/** Fold one run's events (any order; they are sorted by seq here) into a status. */
export function deriveStatus(events: readonly StoredEvent[], o: DeriveOptions): HostStatus {
  const s = emptyStatus(o);
  if (events.length === 0) return s;
  const sorted = [...events].sort((a, b) => a.event.seq - b.event.seq);
  s.run_id = sorted[0]!.event.run_id;
  // Widened on purpose: the fold below moves it on to done or failed.
  s.state = "running" as RunState;
  const fold = new RunFold(s);
  for (const { event } of sorted) fold.apply(event);

  const lastReceived = Math.max(...sorted.map((e) => e.receivedAt.getTime())) / 1000;
  s.last_received_at = lastReceived;
  s.silent_s = Math.max(0, o.now.getTime() / 1000 - lastReceived);
  s.events = sorted.length;
  s.missing_seqs = sorted[sorted.length - 1]!.event.seq + 1 - sorted.length;
  s.steps = [...fold.steps.values()];
  s.current_steps = s.steps.filter((st) => st.state === "running").map((st) => st.name);
  s.failure = fold.failure;
  s.percent = s.state === "done" ? 100 : Math.round(currentPercent(fold, s.steps) * 10) / 10;
  if (s.state === "running" && s.silent_s > o.staleAfterS) s.state = "stale";
  s.phase = s.state === "running" || s.state === "stale" ? (fold.progress?.phase ?? derivedPhase(s)) : derivedPhase(s);
  s.eta_s = etaSeconds(s);
  return s;
}

/** The status of the host's latest run (by the host's start time), read from the store. */
export async function hostStatus(db: Queryable, hostId: string, opts: { now?: Date; staleAfterS?: number } = {}): Promise<HostStatus> {
  const o: DeriveOptions = { hostId, now: opts.now ?? new Date(), staleAfterS: opts.staleAfterS ?? DEFAULT_STALE_AFTER_S };
  const runs = await listRuns(db, hostId);
  o.runs = runs.length;
  const latest = runs[0];
  if (!latest) return emptyStatus(o);
  return deriveStatus(await listRunEvents(db, hostId, latest.runId), o);
}

/** What the stream compares to decide whether anything changed. */
export function statusFingerprint(s: HostStatus): string {
  return JSON.stringify({ ...s, silent_s: null, generated_at: null });
}
