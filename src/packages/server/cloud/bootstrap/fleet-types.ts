/**
 * The fleet view's model, as served by `GET …/fleet/status`. Dependency-free
 * on purpose: the browser page compiles it too.
 */
import type { RunState } from "./status-types.js";

/** One host's latest run. */
export interface FleetHost {
  host_id: string;
  /** The host record's name, null for a host the hub only knows from events. */
  name: string | null;
  run_id: string | null;
  state: RunState;
  phase: string;
  percent: number;
  /** Seconds since the run started (hub clock minus the run's start), null without a run. */
  age_s: number | null;
  /** Seconds since the hub last heard from the host, null without a run. */
  silent_s: number | null;
  failed_step: string | null;
  /** The step(s) running now. */
  current_steps: string[];
  runs: number;
}

/** One step's durations over the fleet's runs that started in the window. */
export interface FleetStep {
  step: string;
  /** Runs in which the step ended (changed, unchanged or failed; blocked ones are not counted). */
  runs: number;
  p50_s: number;
  p95_s: number;
  max_s: number;
  changed: number;
  failed: number;
  /**
   * The same over the runs in which the step did work (changed or failed): an
   * idle re-run's quick "unchanged" does not hide a step that is slow when it
   * has something to do. Null when it never did work in the window.
   */
  work_p50_s: number | null;
  work_p95_s: number | null;
}

export interface FleetView {
  generated_at: number;
  window_s: number;
  /** Runs that started at or after this time (unix s) count in `steps`. */
  since_ts: number;
  stale_after_s: number;
  /** Hosts the hub knows, and how many are listed (`limit`). */
  hosts_total: number;
  counts: Record<RunState, number>;
  /** Failed and stale first, then running, pending, done; each by age, oldest first. */
  hosts: FleetHost[];
  /** Slowest p95 first. */
  steps: FleetStep[];
}
