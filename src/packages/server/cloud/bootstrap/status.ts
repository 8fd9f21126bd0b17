/**
 * Derive a host's status from its stored events. Pure: the store reads, this
 * folds, so the same rules serve the status route, the stream and the tests.
 *
 * Bounded whatever the run's size: the fold only needs a run's *digest* (the
 * latest run_start, progress and run_end, the first and last step_start and
 * step_end of each step, the first failed step_end, plus counts), which the
 * store selects in SQL (`readLatestRunDigest`) and `digestEvents` selects the same
 * way from a list. Event times the host dated implausibly far ahead of their
 * arrival are replaced by the arrival time (`effectiveTs`).
 */
import type { BootstrapEvent } from "@cocalc/project-host-bootstrap";
import type { Queryable } from "./db.js";
import type { FailureInfo, HostStatus, RunState, StepStatus } from "./status-types.js";
import { effectiveTs, type RunDigest, readLatestRunDigest, type StoredEvent } from "./store.js";

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

/**
 * The fold. Its rules only ever look at the latest run_start, progress and
 * run_end, the first and last step_start and step_end of each step, and the
 * first failed step_end, so folding a run's digest gives exactly what folding
 * all of its events gives (the fuzz tests check this):
 *
 * - the plan (step order, deps, weights) is the latest run_start's; steps
 *   that have events but are not in the plan follow it, in order of their
 *   first event;
 * - a step's start is its latest step_start, else its first step_end minus
 *   that duration; its outcome, end, duration, message and hint are its
 *   latest step_end's;
 * - the run's end is its latest run_end; a failure names that run_end's
 *   failed step, with the first failed step_end's message when it is the same step.
 */
class RunFold {
  private readonly touched = new Map<string, StepStatus>();
  private plan: { name: string; deps: string[]; weight: number }[] = [];
  private runEnd: { ok: boolean; failed_step: string | null; hint: string | null; log_tail: string | null } | null = null;
  progress: { phase: string; percent: number; ts: number; seq: number } | null = null;
  lastStepEndSeq = -1;
  private firstFailure: FailureInfo | null = null;

  constructor(readonly s: HostStatus) {}

  private step(name: string): StepStatus {
    let st = this.touched.get(name);
    if (!st) {
      st = newStep(name);
      this.touched.set(name, st);
    }
    return st;
  }

  apply(e: BootstrapEvent, receivedAt: Date): void {
    const s = this.s;
    const ts = effectiveTs(e.ts, receivedAt);
    switch (e.type) {
      case "run_start":
        s.started_ts = ts;
        s.version = e.version;
        s.parallel = e.parallel;
        this.plan = e.steps;
        break;
      case "step_start": {
        const st = this.step(e.step);
        st.started_ts = ts;
        if (st.state === "pending") st.state = "running";
        break;
      }
      case "step_end": {
        const st = this.step(e.step);
        st.state = e.outcome;
        st.ended_ts = ts;
        st.duration_s = e.duration_s;
        st.started_ts ??= ts - e.duration_s;
        st.message = e.message;
        st.hint = e.hint;
        this.lastStepEndSeq = e.seq;
        if (e.outcome === "failed" && !this.firstFailure) {
          this.firstFailure = { step: e.step, message: e.message || null, hint: e.hint, log_tail: e.log_tail };
        }
        break;
      }
      case "progress":
        this.progress = { phase: e.phase, percent: e.percent, ts, seq: e.seq };
        break;
      case "run_end":
        s.state = e.ok ? "done" : "failed";
        s.ended_ts = ts;
        s.wall_s = e.wall_s;
        this.runEnd = e;
        break;
    }
  }

  /** The steps: the plan's in its order, then the others in order of their first event. */
  get steps(): StepStatus[] {
    const out: StepStatus[] = [];
    const planned = new Set<string>();
    for (const info of this.plan) {
      if (planned.has(info.name)) continue;
      planned.add(info.name);
      out.push({ ...(this.touched.get(info.name) ?? newStep(info.name)), deps: info.deps, weight: info.weight });
    }
    for (const st of this.touched.values()) if (!planned.has(st.name)) out.push(st);
    return out;
  }

  get failure(): FailureInfo | null {
    const end = this.runEnd;
    if (!end) return this.firstFailure;
    if (end.ok) return this.firstFailure;
    const stepFailure = this.firstFailure?.step === end.failed_step ? this.firstFailure : null;
    return {
      step: end.failed_step,
      message: stepFailure?.message ?? null,
      hint: end.hint ?? stepFailure?.hint ?? null,
      log_tail: end.log_tail ?? stepFailure?.log_tail ?? null,
    };
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

type DigestKind = "run_start" | "progress" | "run_end" | "first_step" | "last_step" | "first_failure";

/**
 * The events of a run that decide its status (the same selection as
 * `readLatestRunDigest` in SQL), with the counts; any order in, seq order out.
 */
export function digestEvents(events: readonly StoredEvent[]): RunDigest | null {
  if (events.length === 0) return null;
  const keep = new Map<string, StoredEvent>();
  const offer = (key: string, e: StoredEvent, want: "min" | "max") => {
    const had = keep.get(key);
    if (!had || (want === "max" ? e.event.seq > had.event.seq : e.event.seq < had.event.seq)) keep.set(key, e);
  };
  let maxSeq = -1;
  let lastEventTs = -Infinity;
  let lastReceived = -Infinity;
  for (const e of events) {
    const ev = e.event;
    maxSeq = Math.max(maxSeq, ev.seq);
    lastEventTs = Math.max(lastEventTs, effectiveTs(ev.ts, e.receivedAt));
    lastReceived = Math.max(lastReceived, e.receivedAt.getTime());
    if (ev.type === "run_start" || ev.type === "progress" || ev.type === "run_end") offer(ev.type satisfies DigestKind, e, "max");
    if (ev.type === "step_start" || ev.type === "step_end") {
      offer(`first_step:${ev.type}:${ev.step}`, e, "min");
      offer(`last_step:${ev.type}:${ev.step}`, e, "max");
      if (ev.type === "step_end" && ev.outcome === "failed") offer("first_failure", e, "min");
    }
  }
  const bySeq = new Map<number, StoredEvent>();
  for (const e of keep.values()) bySeq.set(e.event.seq, e);
  return {
    events: [...bySeq.values()].sort((a, b) => a.event.seq - b.event.seq),
    count: events.length,
    maxSeq,
    lastEventTs,
    lastReceivedAt: new Date(lastReceived),
  };
}

/** Fold one run's events (any order) into a status. */
export function deriveStatus(events: readonly StoredEvent[], o: DeriveOptions): HostStatus {
  const digest = digestEvents(events);
  return digest ? deriveStatusFromDigest(digest, o) : emptyStatus(o);
}

/** Folds so far in this process, and the events they folded (what the streaming-cost test counts). */
export const foldCounters = { folds: 0, eventsFolded: 0 };

/** Fold a run's digest (see digestEvents / readLatestRunDigest) into a status. */
export function deriveStatusFromDigest(d: RunDigest, o: DeriveOptions): HostStatus {
  foldCounters.folds += 1;
  foldCounters.eventsFolded += d.events.length;
  const s = emptyStatus(o);
  const sorted = [...d.events].sort((a, b) => a.event.seq - b.event.seq);
  s.run_id = sorted[0]?.event.run_id ?? null;
  // Widened on purpose: the fold below moves it on to done or failed.
  s.state = "running" as RunState;
  const fold = new RunFold(s);
  for (const { event, receivedAt } of sorted) fold.apply(event, receivedAt);

  const lastReceived = d.lastReceivedAt.getTime() / 1000;
  s.last_event_ts = d.lastEventTs;
  s.last_received_at = lastReceived;
  s.silent_s = Math.max(0, o.now.getTime() / 1000 - lastReceived);
  s.events = d.count;
  s.missing_seqs = d.maxSeq + 1 - d.count;
  s.steps = fold.steps;
  s.current_steps = s.steps.filter((st) => st.state === "running").map((st) => st.name);
  s.failure = fold.failure;
  s.percent = s.state === "done" ? 100 : Math.round(currentPercent(fold, s.steps) * 10) / 10;
  if (s.state === "running" && s.silent_s > o.staleAfterS) s.state = "stale";
  s.phase = s.state === "running" || s.state === "stale" ? (fold.progress?.phase ?? derivedPhase(s)) : derivedPhase(s);
  s.eta_s = etaSeconds(s);
  return s;
}

/** The status of the host's latest run (see listRuns), read from the store in bounded time and memory. */
export async function hostStatus(db: Queryable, hostId: string, opts: { now?: Date; staleAfterS?: number } = {}): Promise<HostStatus> {
  const o: DeriveOptions = { hostId, now: opts.now ?? new Date(), staleAfterS: opts.staleAfterS ?? DEFAULT_STALE_AFTER_S };
  const latest = await readLatestRunDigest(db, hostId);
  o.runs = latest?.runs ?? 0;
  return latest ? deriveStatusFromDigest(latest.digest, o) : emptyStatus(o);
}

/** What the stream compares to decide whether anything changed. */
export function statusFingerprint(s: HostStatus): string {
  return JSON.stringify({ ...s, silent_s: null, generated_at: null });
}
