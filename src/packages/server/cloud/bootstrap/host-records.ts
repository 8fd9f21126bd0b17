/**
 * The hub's host records: what upstream keeps in `hosts.metadata.bootstrap`.
 *
 * The hub implements one small interface, `BootstrapStatusAdapter`, and is
 * called with the shape upstream's `metadata.bootstrap` has (`status`
 * pending/running/done/error, `message`, `updated_at`) plus this project's
 * phase, percent, failed step and run id:
 *
 * - at provisioning, `pending`, inside the transaction that stores the host's
 *   config, secrets and token (`ctx.db` is that transaction: an adapter that
 *   writes the hub's hosts table through it commits or rolls back with them);
 * - after that, whenever a host's events change what the status says
 *   (`ctx.db` is the hub's database; no transaction is held across the call).
 *
 * `done` means exactly "the daemon is up and healthy": the latest run ended
 * ok *and* its `service` step (whose check is the unit active, current and
 * answering its health URL, and whose apply waits for that) ended changed or
 * unchanged in that run. A run that ended ok without the service step (a
 * partial run, `--only`/`--skip`) says nothing about the daemon: it is an
 * `error` that says so, never `done`.
 *
 * Delivery never holds up or loses a batch of events: the events route stores
 * and acknowledges the batch first, then the reporter derives the host's status
 * (bounded, status.ts) and calls the adapter in the background, at most one
 * call per host at a time (a burst of batches is coalesced: the adapter hears
 * the latest status, not every intermediate one). An adapter that throws or
 * times out is logged and recorded in `bootstrap_host_records` (attempts,
 * last_error, next_attempt_at with backoff); the hub's sweep retries it, and
 * so does the host's next batch. Every call is re-derived fresh and each
 * hub re-checks after its call, so several hubs converge on the latest
 * status (after each call a hub derives once more and calls again if the
 * status moved on, so a slow call that lands late is corrected); calls are at
 * least once (the adapter must be idempotent, which a merge into
 * `metadata.bootstrap` is).
 */
import type { Db, Queryable } from "./db.js";
import type { ErrorLogger } from "./http-errors.js";
import { hostStatus } from "./status.js";
import type { HostStatus } from "./status-types.js";

export type BootstrapStatusValue = "pending" | "running" | "done" | "error";

/** upstream's `metadata.bootstrap`, plus phase, percent, failed step and run id. */
export interface BootstrapMetadata {
  status: BootstrapStatusValue;
  message: string;
  /** ISO 8601, the hub's clock. */
  updated_at: string;
  phase: string;
  percent: number;
  failed_step: string | null;
  run_id: string | null;
  /** Set with `pending` at provisioning (upstream: `pending_at`, `source: "cloud-init"`). */
  pending_at?: string;
  source?: "cloud-init";
}

export interface BootstrapStatusContext {
  /** The provisioning transaction (for `pending`), else the hub's database. */
  db: Queryable;
}

/** What the hub implements. Must be idempotent: a status may be delivered more than once. */
export interface BootstrapStatusAdapter {
  onBootstrapStatus(hostId: string, status: BootstrapMetadata, ctx: BootstrapStatusContext): Promise<void> | void;
}

/** The step whose success in a run means the daemon is up and healthy (steps_system.py ServiceStep). */
export const HEALTH_STEP = "service";

export const PENDING_MESSAGE = "waiting for the host to start bootstrapping";

/** `pending`, as provisioning writes it. */
export function pendingMetadata(now: Date): BootstrapMetadata {
  const at = now.toISOString();
  return {
    status: "pending",
    message: PENDING_MESSAGE,
    updated_at: at,
    phase: "pending",
    percent: 0,
    failed_step: null,
    run_id: null,
    pending_at: at,
    source: "cloud-init",
  };
}

/** The host's status (status.ts) as `metadata.bootstrap`. Pure. */
export function bootstrapMetadata(s: HostStatus, now: Date): BootstrapMetadata {
  const base = { updated_at: now.toISOString(), phase: s.phase, percent: s.percent, run_id: s.run_id, failed_step: null };
  switch (s.state) {
    case "pending":
      return { ...base, status: "pending", message: PENDING_MESSAGE, phase: "pending", percent: 0 };
    case "running":
      return { ...base, status: "running", message: s.phase };
    case "stale":
      return { ...base, status: "running", message: `${s.phase} (no news from the host for over ${s.stale_after_s}s)` };
    case "failed": {
      const f = s.failure;
      const what = [f?.message, f?.hint].filter((x): x is string => !!x).join(" ");
      return {
        ...base,
        status: "error",
        failed_step: f?.step ?? null,
        message: `bootstrap failed${f?.step ? ` at ${f.step}` : ""}${what ? `: ${what}` : ""}`,
      };
    }
    case "done": {
      const health = s.steps.find((st) => st.name === HEALTH_STEP);
      if (health && (health.state === "changed" || health.state === "unchanged")) {
        return { ...base, status: "done", message: "the daemon is up and healthy" };
      }
      return {
        ...base,
        status: "error",
        message: `the run ended without the ${HEALTH_STEP} step, so the daemon's health is unknown; run the whole plan (no --only/--skip)`,
      };
    }
  }
}

/** What decides whether the adapter hears about a change (not the time stamps). */
export function metadataFingerprint(m: BootstrapMetadata): string {
  return JSON.stringify([m.status, m.message, m.phase, m.percent, m.failed_step, m.run_id]);
}

// --- the store of deliveries -------------------------------------------------------

/** Record `status` as delivered (in the provisioning transaction, or after an adapter call). */
export async function recordDelivered(db: Queryable, hostId: string, status: BootstrapMetadata, checkedAt: Date, now: Date): Promise<void> {
  await db.query(
    `INSERT INTO bootstrap_host_records (host_id, status, fingerprint, delivered_at, checked_at, attempts, last_error, next_attempt_at)
     VALUES ($1, $2::jsonb, $3, $4, $5, 0, NULL, NULL)
     ON CONFLICT (host_id) DO UPDATE SET status = EXCLUDED.status, fingerprint = EXCLUDED.fingerprint,
       delivered_at = EXCLUDED.delivered_at, checked_at = EXCLUDED.checked_at, attempts = 0, last_error = NULL, next_attempt_at = NULL`,
    [hostId, JSON.stringify(status), metadataFingerprint(status), now, checkedAt],
  );
}

async function recordChecked(db: Queryable, hostId: string, checkedAt: Date): Promise<void> {
  await db.query(
    "UPDATE bootstrap_host_records SET checked_at = greatest(checked_at, $2), attempts = 0, last_error = NULL, next_attempt_at = NULL WHERE host_id = $1",
    [hostId, checkedAt],
  );
}

async function recordFailure(db: Queryable, hostId: string, error: string, nextAttemptAt: Date): Promise<void> {
  await db.query(
    `INSERT INTO bootstrap_host_records (host_id, attempts, last_error, next_attempt_at) VALUES ($1, 1, $2, $3)
     ON CONFLICT (host_id) DO UPDATE SET attempts = bootstrap_host_records.attempts + 1, last_error = EXCLUDED.last_error,
       next_attempt_at = EXCLUDED.next_attempt_at`,
    [hostId, error, nextAttemptAt],
  );
}

export interface HostRecordState {
  status: BootstrapMetadata | null;
  fingerprint: string | null;
  deliveredAt: Date | null;
  checkedAt: Date | null;
  attempts: number;
  lastError: string | null;
  nextAttemptAt: Date | null;
}

export async function getHostRecordState(db: Queryable, hostId: string): Promise<HostRecordState | null> {
  const rows = await db.query<{
    status: BootstrapMetadata | null;
    fingerprint: string | null;
    delivered_at: Date | null;
    checked_at: Date | null;
    attempts: number;
    last_error: string | null;
    next_attempt_at: Date | null;
  }>("SELECT status, fingerprint, delivered_at, checked_at, attempts, last_error, next_attempt_at FROM bootstrap_host_records WHERE host_id = $1", [hostId]);
  const r = rows[0];
  if (!r) return null;
  return {
    status: r.status,
    fingerprint: r.fingerprint,
    deliveredAt: r.delivered_at,
    checkedAt: r.checked_at,
    attempts: r.attempts,
    lastError: r.last_error,
    nextAttemptAt: r.next_attempt_at,
  };
}

/** Hosts whose events arrived after they were last checked, and whose retry (if any) is due. */
async function dueHosts(db: Queryable, now: Date, limit: number): Promise<string[]> {
  const rows = await db.query<{ host_id: string }>(
    `SELECT r.host_id FROM (SELECT host_id, max(last_received_at) AS last FROM bootstrap_runs GROUP BY host_id) r
       LEFT JOIN bootstrap_host_records s ON s.host_id = r.host_id
      WHERE (s.checked_at IS NULL OR r.last > s.checked_at) AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= $1)
      ORDER BY r.last LIMIT $2`,
    [now, limit],
  );
  return rows.map((r) => r.host_id);
}

// --- the reporter ------------------------------------------------------------------

export interface HostRecordReporterOptions {
  db: Db;
  adapter: BootstrapStatusAdapter;
  now: () => Date;
  staleAfterS: number;
  logError: ErrorLogger;
  /** How often the sweep looks for undelivered statuses (default 10 s; 0: never, tests call sweep()). */
  sweepMs?: number;
  /** An adapter call that takes longer counts as failed (default 10 s). */
  timeoutMs?: number;
  /** First retry delay after a failure (doubles up to 5 min; default 5 s). */
  retryBaseMs?: number;
}

/** What one delivery did: nothing to tell, told, or refused (the sweep retries after the backoff). */
type Delivery = "unchanged" | "delivered" | "failed";

/** Events received this long before a derivation may not be in it yet (a commit racing it): checked again. */
const CHECK_MARGIN_MS = 2000;
const RETRY_MAX_MS = 5 * 60 * 1000;

function errorText(err: unknown): string {
  const text = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  return text.slice(0, 500);
}

/** Calls the adapter after events change a host's status; retries refusals. */
export class HostRecordReporter {
  /** Adapter calls made, and how many failed (for tests and the operator). */
  calls = 0;
  failures = 0;
  private readonly busy = new Map<string, { again: boolean; done: Promise<void> }>();
  private readonly sweeper: NodeJS.Timeout | null;
  private closed = false;

  constructor(private readonly o: HostRecordReporterOptions) {
    const every = o.sweepMs ?? 10_000;
    this.sweeper = every > 0 ? setInterval(() => void this.sweep().catch((err: unknown) => o.logError("host records sweep", err)), every) : null;
    this.sweeper?.unref();
  }

  /** The host's events changed: derive and deliver soon (coalesced per host). Never throws. */
  changed(hostId: string): void {
    if (this.closed) return;
    const running = this.busy.get(hostId);
    if (running) {
      running.again = true;
      return;
    }
    const entry = { again: false, done: Promise.resolve() };
    this.busy.set(hostId, entry);
    entry.done = (async () => {
      try {
        // After a call, derive once more: a call that finished late (here or on another hub)
        // may have written an older status over a newer one; this hub's last word is the latest.
        let outcome: Delivery;
        do {
          entry.again = false;
          outcome = await this.deliver(hostId);
        } while (!this.closed && (outcome === "delivered" || (outcome === "unchanged" && entry.again)));
      } finally {
        this.busy.delete(hostId);
      }
    })();
  }

  /** Retry every host whose status is due; returns how many were looked at. */
  async sweep(limit = 100): Promise<number> {
    const hosts = await dueHosts(this.o.db, this.o.now(), limit);
    for (const h of hosts) this.changed(h);
    await this.flush();
    return hosts.length;
  }

  /** Wait until no delivery is in flight. */
  async flush(): Promise<void> {
    while (this.busy.size > 0) await Promise.all([...this.busy.values()].map((e) => e.done));
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.sweeper) clearInterval(this.sweeper);
    await this.flush();
  }

  /** One derivation and, if it changed, one adapter call. */
  private async deliver(hostId: string): Promise<Delivery> {
    const { db, adapter, logError } = this.o;
    const t0 = this.o.now();
    const checkedAt = new Date(t0.getTime() - CHECK_MARGIN_MS);
    let status: BootstrapMetadata;
    try {
      status = bootstrapMetadata(await hostStatus(db, hostId, { now: t0, staleAfterS: this.o.staleAfterS }), t0);
      const known = await getHostRecordState(db, hostId);
      if (known?.fingerprint === metadataFingerprint(status)) {
        await recordChecked(db, hostId, checkedAt);
        return "unchanged";
      }
    } catch (err) {
      logError(`host records: cannot derive the status of host ${hostId}`, err);
      return "failed";
    }
    this.calls += 1;
    try {
      await withTimeout(Promise.resolve(adapter.onBootstrapStatus(hostId, status, { db })), this.o.timeoutMs ?? 10_000);
    } catch (err) {
      this.failures += 1;
      const attempts = ((await getHostRecordState(db, hostId).catch(() => null))?.attempts ?? 0) + 1;
      const delay = Math.min(RETRY_MAX_MS, (this.o.retryBaseMs ?? 5000) * 2 ** Math.min(attempts - 1, 16));
      logError(`host records: onBootstrapStatus(${hostId}, ${status.status}) failed (attempt ${attempts}; retried in ${Math.round(delay / 1000)}s)`, err);
      await recordFailure(db, hostId, errorText(err), new Date(this.o.now().getTime() + delay)).catch((e: unknown) =>
        logError(`host records: cannot record the failed delivery for host ${hostId}`, e),
      );
      return "failed";
    }
    try {
      await recordDelivered(db, hostId, status, checkedAt, this.o.now());
    } catch (err) {
      logError(`host records: delivered to host ${hostId} but cannot record it (it is delivered again)`, err);
      return "failed";
    }
    return "delivered";
  }
}

class AdapterTimeoutError extends Error {
  override readonly name = "AdapterTimeoutError";
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new AdapterTimeoutError(`onBootstrapStatus did not finish within ${ms} ms`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

// --- a reference adapter: a hosts table with a jsonb metadata column ------------------

const IDENT_RE = /^[a-z_][a-z0-9_]{0,62}$/;

function ident(what: string, name: string): string {
  if (!IDENT_RE.test(name)) throw new Error(`${what} ${JSON.stringify(name)} must be a plain lowercase SQL identifier (${IDENT_RE.source})`);
  return name;
}

/**
 * An adapter that merges the status into `<table>.<metadata>->'bootstrap'`
 * (upstream's shape: the keys given replace those in `metadata.bootstrap`,
 * the others stay), for the row whose `<id>` is the host id. A host without
 * a row is an error (retried): the hub creates the row before provisioning.
 */
export function jsonbMetadataAdapter(opts: { table: string; idColumn?: string; metadataColumn?: string }): BootstrapStatusAdapter {
  const table = ident("table", opts.table);
  const id = ident("idColumn", opts.idColumn ?? "id");
  const metadata = ident("metadataColumn", opts.metadataColumn ?? "metadata");
  const sql = `UPDATE ${table} SET ${metadata} = jsonb_set(coalesce(${metadata}, '{}'::jsonb), '{bootstrap}',
      (CASE WHEN $3 THEN '{}'::jsonb ELSE coalesce(${metadata}->'bootstrap', '{}'::jsonb) END) || $2::jsonb)
    WHERE ${id} = $1 RETURNING 1 AS one`;
  return {
    async onBootstrapStatus(hostId, status, ctx) {
      // pending starts a new record (upstream: provisioning and a changed tunnel reset it); the rest merge.
      const rows = await ctx.db.query<{ one: number }>(sql, [hostId, JSON.stringify(status), status.status === "pending"]);
      if (rows.length === 0) throw new Error(`no row in ${table} with ${id} = ${hostId}`);
    },
  };
}
