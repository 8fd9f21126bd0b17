/**
 * The fleet view: every host's latest run, and per step the p50 and p95
 * duration across the fleet's runs in a time window, so an operator sees at
 * once which step is slow everywhere and which host is stuck.
 *
 * Each host's line is its status (status.ts, the same rules as its own
 * page, bounded per host). The step durations are aggregated in SQL with
 * `percentile_cont`, whose definition `percentileCont` below restates (the
 * property tests check that the two agree).
 */
import { z } from "zod/v4";
import type { Queryable } from "./db.js";
import type { FleetHost, FleetStep, FleetView } from "./fleet-types.js";
import { hostStatus } from "./status.js";
import type { RunState } from "./status-types.js";

export type { FleetHost, FleetStep, FleetView } from "./fleet-types.js";

export const FLEET_WINDOW_DEFAULT_S = 7 * 24 * 3600;
export const FLEET_WINDOW_MIN_S = 60;
export const FLEET_WINDOW_MAX_S = 366 * 24 * 3600;
export const FLEET_LIMIT_DEFAULT = 500;
export const FLEET_LIMIT_MAX = 5000;
/** Hosts whose status is derived at once. */
const CONCURRENCY = 8;

const intParam = (min: number, max: number) =>
  z
    .string({ error: "must be given once, as a whole number" })
    .regex(/^[0-9]{1,10}$/, { message: "must be a whole number of digits" })
    .transform(Number)
    .pipe(
      z
        .int()
        .min(min, { message: `must be at least ${min}` })
        .max(max, { message: `must be at most ${max}` }),
    );

/** The fleet routes' query string (Express's simple parser: a repeated key is an array, refused). */
export const FleetQuerySchema = z.strictObject({
  window_s: intParam(FLEET_WINDOW_MIN_S, FLEET_WINDOW_MAX_S).optional(),
  limit: intParam(1, FLEET_LIMIT_MAX).optional(),
});
export type FleetQuery = z.output<typeof FleetQuerySchema>;

/**
 * The p-quantile of ascending `sorted` by linear interpolation between the
 * closest ranks: exactly PostgreSQL's `percentile_cont(p)`. NaN for no values.
 */
export function percentileCont(sorted: readonly number[], p: number): number {
  if (!(p >= 0 && p <= 1)) throw new RangeError(`percentile must be within [0, 1], got ${p}`);
  const n = sorted.length;
  if (n === 0) return Number.NaN;
  const pos = p * (n - 1);
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  const a = sorted[lo]!;
  const b = sorted[hi]!;
  return lo === hi ? a : a + (b - a) * (pos - lo);
}

const STATE_ORDER: Record<RunState, number> = { failed: 0, stale: 1, running: 2, pending: 3, done: 4 };

/** Hosts the hub knows (records, or only events), most recently active first. */
async function knownHosts(db: Queryable, limit: number): Promise<{ total: number; hosts: { host_id: string; name: string | null }[] }> {
  const rows = await db.query<{ host_id: string; name: string | null; total: number }>(
    `WITH known AS (
       SELECT host_id, max(at) AS at FROM (
         SELECT host_id, updated_at AS at FROM bootstrap_hosts
         UNION ALL SELECT host_id, max(last_received_at) FROM bootstrap_runs GROUP BY host_id) k
       GROUP BY host_id)
     SELECT k.host_id, h.record->>'name' AS name, (SELECT count(*)::integer FROM known) AS total
       FROM known k LEFT JOIN bootstrap_hosts h ON h.host_id = k.host_id
      ORDER BY k.at DESC, k.host_id LIMIT $1`,
    [limit],
  );
  return { total: rows[0]?.total ?? 0, hosts: rows.map((r) => ({ host_id: r.host_id, name: r.name })) };
}

/**
 * Per step, the durations of its latest step_end in each run that started at
 * or after `sinceTs` (blocked ones left out), slowest p95 first.
 */
export async function fleetStepDurations(db: Queryable, sinceTs: number): Promise<FleetStep[]> {
  const rows = await db.query<{
    step: string;
    runs: number;
    p50: number;
    p95: number;
    max: number;
    changed: number;
    failed: number;
    work_p50: number | null;
    work_p95: number | null;
  }>(
    `WITH ends AS (
       SELECT DISTINCT ON (e.host_id, e.run_id, e.body->>'step')
              e.body->>'step' AS step, e.body->>'outcome' AS outcome, (e.body->>'duration_s')::double precision AS d
         FROM bootstrap_runs r JOIN bootstrap_events e ON e.host_id = r.host_id AND e.run_id = r.run_id AND e.type = 'step_end'
        WHERE r.started_ts >= $1
        ORDER BY e.host_id, e.run_id, e.body->>'step', e.seq DESC)
     SELECT step, count(*)::integer AS runs,
            percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50,
            percentile_cont(0.95) WITHIN GROUP (ORDER BY d) AS p95,
            max(d) AS max,
            (count(*) FILTER (WHERE outcome = 'changed'))::integer AS changed,
            (count(*) FILTER (WHERE outcome = 'failed'))::integer AS failed,
            percentile_cont(0.5) WITHIN GROUP (ORDER BY d) FILTER (WHERE outcome <> 'unchanged') AS work_p50,
            percentile_cont(0.95) WITHIN GROUP (ORDER BY d) FILTER (WHERE outcome <> 'unchanged') AS work_p95
       FROM ends WHERE outcome <> 'blocked'
      GROUP BY step ORDER BY p95 DESC, step`,
    [sinceTs],
  );
  return rows.map((r) => ({
    step: r.step,
    runs: r.runs,
    p50_s: Number(r.p50),
    p95_s: Number(r.p95),
    max_s: Number(r.max),
    changed: r.changed,
    failed: r.failed,
    work_p50_s: r.work_p50 === null ? null : Number(r.work_p50),
    work_p95_s: r.work_p95 === null ? null : Number(r.work_p95),
  }));
}

/** The fleet view at `now`. */
export async function fleetView(db: Queryable, opts: { now: Date; staleAfterS: number; windowS?: number; limit?: number }): Promise<FleetView> {
  const nowS = opts.now.getTime() / 1000;
  const windowS = opts.windowS ?? FLEET_WINDOW_DEFAULT_S;
  const known = await knownHosts(db, opts.limit ?? FLEET_LIMIT_DEFAULT);
  const hosts: FleetHost[] = new Array(known.hosts.length);
  let next = 0;
  const worker = async () => {
    for (let i = next++; i < known.hosts.length; i = next++) {
      const h = known.hosts[i]!;
      const s = await hostStatus(db, h.host_id, { now: opts.now, staleAfterS: opts.staleAfterS });
      hosts[i] = {
        host_id: h.host_id,
        name: h.name,
        run_id: s.run_id,
        state: s.state,
        phase: s.phase,
        percent: s.percent,
        age_s: s.started_ts === null ? null : Math.max(0, Math.round(nowS - s.started_ts)),
        silent_s: s.silent_s === null ? null : Math.round(s.silent_s),
        failed_step: s.failure?.step ?? null,
        current_steps: s.current_steps,
        runs: s.runs,
      };
    }
  };
  await Promise.all(Array.from({ length: Math.min(CONCURRENCY, known.hosts.length) }, worker));
  hosts.sort((a, b) => STATE_ORDER[a.state] - STATE_ORDER[b.state] || (b.age_s ?? -1) - (a.age_s ?? -1) || a.host_id.localeCompare(b.host_id));
  const counts: Record<RunState, number> = { failed: 0, stale: 0, running: 0, pending: 0, done: 0 };
  for (const h of hosts) counts[h.state] += 1;
  const sinceTs = nowS - windowS;
  return {
    generated_at: nowS,
    window_s: windowS,
    since_ts: sinceTs,
    stale_after_s: opts.staleAfterS,
    hosts_total: known.total,
    counts,
    hosts,
    steps: await fleetStepDurations(db, sinceTs),
  };
}
