/**
 * The status model of one host's bootstrap, as served by `GET …/status` and
 * the stream. Dependency-free on purpose: the browser page compiles it too.
 * Times named `*_ts` are the host's clock (unix seconds, from the events);
 * `last_received_at` and `generated_at` are the hub's clock.
 */

export type RunState = "pending" | "running" | "done" | "failed" | "stale";
export type StepState = "pending" | "running" | "changed" | "unchanged" | "failed" | "blocked";

export interface StepStatus {
  name: string;
  deps: string[];
  weight: number;
  state: StepState;
  started_ts: number | null;
  ended_ts: number | null;
  duration_s: number | null;
  message: string;
  hint: string | null;
}

export interface FailureInfo {
  step: string | null;
  message: string | null;
  hint: string | null;
  log_tail: string | null;
}

export interface HostStatus {
  host_id: string;
  run_id: string | null;
  /** pending: no events yet; stale: running but silent longer than stale_after_s (not failed). */
  state: RunState;
  phase: string;
  percent: number;
  eta_s: number | null;
  started_ts: number | null;
  ended_ts: number | null;
  wall_s: number | null;
  last_event_ts: number | null;
  last_received_at: number | null;
  silent_s: number | null;
  stale_after_s: number;
  current_steps: string[];
  steps: StepStatus[];
  failure: FailureInfo | null;
  version: string | null;
  parallel: boolean | null;
  events: number;
  /** Sequence numbers below the highest one seen that have not arrived (yet). */
  missing_seqs: number;
  runs: number;
  generated_at: number;
}
