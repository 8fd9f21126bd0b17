/**
 * The bootstrap store: small named async functions over the tables of
 * `migrations/`. Plain SQL that runs unchanged on PostgreSQL and PGlite.
 * Times the hub decides (received_at, expires_at) come from the caller's
 * clock, so tests can move time and all hubs compare like with like.
 */
import type { BootstrapEvent } from "@cocalc/project-host-bootstrap";
import type { Db, Queryable } from "./db.js";

/** NOTIFY channel carrying a host id whenever that host's events change. */
export const HOST_CHANGED_CHANNEL = "bootstrap_host_changed";

// --- hosts -----------------------------------------------------------------------------

export interface StoredHost<Rec = unknown, Config = unknown> {
  hostId: string;
  record: Rec;
  config: Config;
  createdAt: Date;
  updatedAt: Date;
}

export async function saveHost(db: Queryable, host: { hostId: string; record: unknown; config: unknown; now: Date }): Promise<void> {
  await db.query(
    `INSERT INTO bootstrap_hosts (host_id, record, config, created_at, updated_at)
     VALUES ($1, $2::jsonb, $3::jsonb, $4, $4)
     ON CONFLICT (host_id) DO UPDATE SET record = EXCLUDED.record, config = EXCLUDED.config, updated_at = EXCLUDED.updated_at`,
    [host.hostId, JSON.stringify(host.record), JSON.stringify(host.config), host.now],
  );
}

export async function getHost(db: Queryable, hostId: string): Promise<StoredHost | null> {
  const rows = await db.query<{ host_id: string; record: unknown; config: unknown; created_at: Date; updated_at: Date }>(
    "SELECT host_id, record, config, created_at, updated_at FROM bootstrap_hosts WHERE host_id = $1",
    [hostId],
  );
  const r = rows[0];
  return r ? { hostId: r.host_id, record: r.record, config: r.config, createdAt: r.created_at, updatedAt: r.updated_at } : null;
}

// --- tokens ----------------------------------------------------------------------------

export interface StoredToken {
  tokenHash: string;
  hostId: string;
  createdAt: Date;
  expiresAt: Date;
  revokedAt: Date | null;
  /** When the token was exchanged for a host credential (single use), and from where. */
  exchangedAt?: Date | null;
  exchangedFrom?: string | null;
  /** The sha256 of the host-chosen credential it was exchanged for (null: a hub-made one, older stubs). */
  exchangedFor?: string | null;
}

interface TokenRow {
  token_hash: string;
  host_id: string;
  created_at: Date;
  expires_at: Date;
  revoked_at: Date | null;
  exchanged_at: Date | null;
  exchanged_from: string | null;
  exchanged_for: string | null;
}

const TOKEN_COLUMNS = "token_hash, host_id, created_at, expires_at, revoked_at, exchanged_at, exchanged_from, exchanged_for";

function tokenFromRow(r: TokenRow): StoredToken {
  return {
    tokenHash: r.token_hash,
    hostId: r.host_id,
    createdAt: r.created_at,
    expiresAt: r.expires_at,
    revokedAt: r.revoked_at,
    exchangedAt: r.exchanged_at,
    exchangedFrom: r.exchanged_from,
    exchangedFor: r.exchanged_for,
  };
}

/** Revoke every live token of the host; returns how many were revoked. */
export async function revokeHostTokens(db: Queryable, hostId: string, now: Date): Promise<number> {
  const rows = await db.query<{ token_hash: string }>(
    "UPDATE bootstrap_tokens SET revoked_at = $2 WHERE host_id = $1 AND revoked_at IS NULL RETURNING token_hash",
    [hostId, now],
  );
  return rows.length;
}

export async function insertToken(db: Queryable, t: Omit<StoredToken, "revokedAt" | "exchangedAt" | "exchangedFrom" | "exchangedFor">): Promise<void> {
  await db.query("INSERT INTO bootstrap_tokens (token_hash, host_id, created_at, expires_at) VALUES ($1, $2, $3, $4)", [
    t.tokenHash,
    t.hostId,
    t.createdAt,
    t.expiresAt,
  ]);
}

export async function findToken(db: Queryable, tokenHash: string): Promise<StoredToken | null> {
  const rows = await db.query<TokenRow>(`SELECT ${TOKEN_COLUMNS} FROM bootstrap_tokens WHERE token_hash = $1`, [tokenHash]);
  return rows[0] ? tokenFromRow(rows[0]) : null;
}

export async function listHostTokens(db: Queryable, hostId: string): Promise<StoredToken[]> {
  const rows = await db.query<TokenRow>(`SELECT ${TOKEN_COLUMNS} FROM bootstrap_tokens WHERE host_id = $1 ORDER BY created_at`, [hostId]);
  return rows.map(tokenFromRow);
}

// --- host credentials (migrations/003) ---------------------------------------------

export interface StoredCredential {
  credentialHash: string;
  hostId: string;
  createdAt: Date;
  rotateAfter: Date;
  supersededAt: Date | null;
  graceUntil: Date | null;
  firstUsedAt: Date | null;
  lastUsedAt: Date | null;
  revokedAt: Date | null;
  revokedWhy: string | null;
}

interface CredentialRow {
  credential_hash: string;
  host_id: string;
  created_at: Date;
  rotate_after: Date;
  superseded_at: Date | null;
  grace_until: Date | null;
  first_used_at: Date | null;
  last_used_at: Date | null;
  revoked_at: Date | null;
  revoked_why: string | null;
}

const CREDENTIAL_COLUMNS =
  "credential_hash, host_id, created_at, rotate_after, superseded_at, grace_until, first_used_at, last_used_at, revoked_at, revoked_why";

function credentialFromRow(r: CredentialRow): StoredCredential {
  return {
    credentialHash: r.credential_hash,
    hostId: r.host_id,
    createdAt: r.created_at,
    rotateAfter: r.rotate_after,
    supersededAt: r.superseded_at,
    graceUntil: r.grace_until,
    firstUsedAt: r.first_used_at,
    lastUsedAt: r.last_used_at,
    revokedAt: r.revoked_at,
    revokedWhy: r.revoked_why,
  };
}

export async function insertCredential(db: Queryable, c: { credentialHash: string; hostId: string; createdAt: Date; rotateAfter: Date }): Promise<void> {
  await db.query("INSERT INTO bootstrap_credentials (credential_hash, host_id, created_at, rotate_after) VALUES ($1, $2, $3, $4)", [
    c.credentialHash,
    c.hostId,
    c.createdAt,
    c.rotateAfter,
  ]);
}

export async function findCredential(db: Queryable, credentialHash: string): Promise<StoredCredential | null> {
  const rows = await db.query<CredentialRow>(`SELECT ${CREDENTIAL_COLUMNS} FROM bootstrap_credentials WHERE credential_hash = $1`, [credentialHash]);
  return rows[0] ? credentialFromRow(rows[0]) : null;
}

export async function listHostCredentials(db: Queryable, hostId: string): Promise<StoredCredential[]> {
  const rows = await db.query<CredentialRow>(
    `SELECT ${CREDENTIAL_COLUMNS} FROM bootstrap_credentials WHERE host_id = $1 ORDER BY created_at, credential_hash`,
    [hostId],
  );
  return rows.map(credentialFromRow);
}

/**
 * Mark a token exchanged, once: true for the one caller that flips it (a
 * concurrent second exchange of the same token gets false).
 */
export async function markTokenExchanged(
  db: Queryable,
  tokenHash: string,
  now: Date,
  address: string | null,
  exchangedFor: string | null = null,
): Promise<boolean> {
  const rows = await db.query<{ token_hash: string }>(
    `UPDATE bootstrap_tokens SET exchanged_at = $2, exchanged_from = $3, exchanged_for = $4
      WHERE token_hash = $1 AND exchanged_at IS NULL AND revoked_at IS NULL RETURNING token_hash`,
    [tokenHash, now, address, exchangedFor],
  );
  return rows.length === 1;
}

/** Revoke the host's live credentials, except `keepHash`; returns how many. */
export async function revokeCredentials(db: Queryable, hostId: string, now: Date, why: string, keepHash: string | null = null): Promise<number> {
  const rows = await db.query<{ credential_hash: string }>(
    `UPDATE bootstrap_credentials SET revoked_at = $2, revoked_why = $3
      WHERE host_id = $1 AND revoked_at IS NULL AND ($4::text IS NULL OR credential_hash <> $4::text) RETURNING credential_hash`,
    [hostId, now, why, keepHash],
  );
  return rows.length;
}

/** The credential was replaced by a rotation: valid until `graceUntil` (an earlier grace is kept). */
export async function supersedeCredential(db: Queryable, credentialHash: string, now: Date, graceUntil: Date): Promise<void> {
  await db.query(
    `UPDATE bootstrap_credentials SET superseded_at = coalesce(superseded_at, $2), grace_until = least(coalesce(grace_until, $3), $3)
      WHERE credential_hash = $1`,
    [credentialHash, now, graceUntil],
  );
}

/**
 * Record a use of a credential (at most one write a minute per credential).
 * The first use of a credential that was not superseded ends its
 * predecessors' grace: they are revoked. Returns how many were revoked.
 */
export async function recordCredentialUse(db: Queryable, c: StoredCredential, now: Date): Promise<number> {
  if (c.lastUsedAt && now.getTime() - c.lastUsedAt.getTime() < 60_000 && c.firstUsedAt) return 0;
  const first = c.firstUsedAt === null;
  await db.query(
    "UPDATE bootstrap_credentials SET first_used_at = coalesce(first_used_at, $2), last_used_at = greatest(coalesce(last_used_at, $2), $2) WHERE credential_hash = $1",
    [c.credentialHash, now],
  );
  if (!first || c.supersededAt !== null) return 0;
  const rows = await db.query<{ credential_hash: string }>(
    `UPDATE bootstrap_credentials SET revoked_at = $3, revoked_why = 'its successor is in use'
      WHERE host_id = $1 AND credential_hash <> $2 AND superseded_at IS NOT NULL AND revoked_at IS NULL RETURNING credential_hash`,
    [c.hostId, c.credentialHash, now],
  );
  return rows.length;
}

export type CredentialLogKind = "exchange" | "retry" | "replay" | "rotate" | "revoke" | "refused";

export interface CredentialLogEntry {
  at: Date;
  kind: CredentialLogKind;
  address: string | null;
  detail: string;
}

/**
 * Add an entry to the host's credential log. A `retry`, `replay` or `refused` entry
 * that repeats one from the same address within a minute is not written
 * again (someone hammering with a leaked token cannot fill the table).
 */
export async function logCredentialEvent(db: Queryable, hostId: string, e: CredentialLogEntry): Promise<void> {
  if (e.kind === "retry" || e.kind === "replay" || e.kind === "refused") {
    await db.query(
      `INSERT INTO bootstrap_credential_log (host_id, at, kind, address, detail)
       SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (
         SELECT 1 FROM bootstrap_credential_log WHERE host_id = $1 AND kind = $3 AND address IS NOT DISTINCT FROM $4 AND detail = $5
            AND at > $2::timestamptz - interval '1 minute' AND at <= $2::timestamptz)`,
      [hostId, e.at, e.kind, e.address, e.detail],
    );
    return;
  }
  await db.query("INSERT INTO bootstrap_credential_log (host_id, at, kind, address, detail) VALUES ($1, $2, $3, $4, $5)", [
    hostId,
    e.at,
    e.kind,
    e.address,
    e.detail,
  ]);
}

/** The host's credential log, newest first (at most `limit`). */
export async function listCredentialLog(db: Queryable, hostId: string, limit = 100): Promise<CredentialLogEntry[]> {
  const rows = await db.query<{ at: Date; kind: CredentialLogKind; address: string | null; detail: string }>(
    "SELECT at, kind, address, detail FROM bootstrap_credential_log WHERE host_id = $1 ORDER BY at DESC, id DESC LIMIT $2",
    [hostId, limit],
  );
  return rows.map((r) => ({ at: r.at, kind: r.kind, address: r.address, detail: r.detail }));
}

// --- secrets ---------------------------------------------------------------------------

export async function saveSecret(db: Queryable, hostId: string, name: string, value: string): Promise<void> {
  await db.query(
    `INSERT INTO bootstrap_secrets (host_id, name, value) VALUES ($1, $2, $3)
     ON CONFLICT (host_id, name) DO UPDATE SET value = EXCLUDED.value`,
    [hostId, name, value],
  );
}

/** Drop every secret stored for a host (delete, deprovision); how many there were. */
export async function deleteHostSecrets(db: Queryable, hostId: string): Promise<number> {
  const rows = await db.query<{ name: string }>("DELETE FROM bootstrap_secrets WHERE host_id = $1 RETURNING name", [hostId]);
  return rows.length;
}

export async function getSecret(db: Queryable, hostId: string, name: string): Promise<string | null> {
  const rows = await db.query<{ value: string }>("SELECT value FROM bootstrap_secrets WHERE host_id = $1 AND name = $2", [hostId, name]);
  return rows[0]?.value ?? null;
}

// --- events ----------------------------------------------------------------------------

export interface StoredEvent {
  event: BootstrapEvent;
  receivedAt: Date;
}

/**
 * How far ahead of the hub's clock a host's event time may be before the hub
 * stops believing it and uses the time it received the event instead (a host
 * with a clock a day ahead must not make its run "the latest" for a day).
 */
export const MAX_CLOCK_AHEAD_S = 300;

/** An event's time as the hub believes it: the host's, unless it is implausibly far ahead of when it arrived. */
export function effectiveTs(ts: number, receivedAt: Date): number {
  const received = receivedAt.getTime() / 1000;
  return ts > received + MAX_CLOCK_AHEAD_S ? received : ts;
}

/** The same rule in SQL, over a bootstrap_events row. */
const EFFECTIVE_TS_SQL = `(CASE WHEN ts > extract(epoch FROM received_at)::double precision + ${MAX_CLOCK_AHEAD_S}
  THEN extract(epoch FROM received_at)::double precision ELSE ts END)`;

/**
 * Fold new event rows (`from`: run_id, seq, ts, received_at) into their
 * runs' bootstrap_runs rows (see migrations/002_run_summaries.sql).
 */
const RUN_SUMMARY_UPSERT_SQL = (from: string, hostId: string) => `
  INSERT INTO bootstrap_runs (host_id, run_id, events, max_seq, started_ts, last_event_ts, last_received_at)
  SELECT ${hostId}, run_id, count(*), max(seq), min(${EFFECTIVE_TS_SQL}), max(${EFFECTIVE_TS_SQL}), max(received_at)
    FROM ${from} GROUP BY run_id
  ON CONFLICT (host_id, run_id) DO UPDATE SET
    events = bootstrap_runs.events + EXCLUDED.events,
    max_seq = greatest(bootstrap_runs.max_seq, EXCLUDED.max_seq),
    started_ts = least(bootstrap_runs.started_ts, EXCLUDED.started_ts),
    last_event_ts = greatest(bootstrap_runs.last_event_ts, EXCLUDED.last_event_ts),
    last_received_at = greatest(bootstrap_runs.last_received_at, EXCLUDED.last_received_at)`;

/**
 * Recompute one run's bootstrap_runs row from all its events (for events
 * written by other means than insertEvents, e.g. a bulk load; O(run size)).
 */
export async function refreshRunSummary(db: Queryable, hostId: string, runId: string): Promise<void> {
  await db.query("DELETE FROM bootstrap_runs WHERE host_id = $1 AND run_id = $2", [hostId, runId]);
  await db.query(
    `WITH rows AS (SELECT run_id, seq, ts, received_at FROM bootstrap_events WHERE host_id = $1 AND run_id = $2)
     ${RUN_SUMMARY_UPSERT_SQL("rows", "$1::uuid")}`,
    [hostId, runId],
  );
}

/** A batch repeats a stored (host, run, seq) with different content: refused whole, nothing stored. */
export class EventConflictError extends Error {
  override readonly name = "EventConflictError";
  constructor(readonly conflicts: readonly { runId: string; seq: number }[]) {
    const shown = conflicts
      .slice(0, 10)
      .map((c) => `run ${c.runId} seq ${c.seq}`)
      .join(", ");
    super(
      `event batch conflicts with stored events (${shown}${conflicts.length > 10 ? ", …" : ""}): the same run and sequence number were stored before with different content; nothing from this batch was stored`,
    );
  }
}

/**
 * Store a batch in one transaction; events already stored (same host, run and
 * seq, same content) are left as they are, so a replayed batch changes
 * nothing. An event that repeats a stored (host, run, seq) with different
 * content (or a batch that holds two such) refuses the whole batch with
 * EventConflictError: never a silent first-write-wins. When anything was new,
 * every hub listening on HOST_CHANGED_CHANNEL hears the host id (delivered on
 * commit). Returns how many events were new.
 */
export async function insertEvents(db: Db, hostId: string, events: readonly BootstrapEvent[], receivedAt: Date): Promise<number> {
  const json = JSON.stringify(events);
  return db.transaction(async (tx) => {
    const rows = await tx.query<{ stored: number }>(
      `WITH ins AS (
         INSERT INTO bootstrap_events (host_id, run_id, seq, type, ts, body, received_at)
         SELECT $1::uuid, e->>'run_id', (e->>'seq')::integer, e->>'type', (e->>'ts')::double precision, e, $3::timestamptz
           FROM jsonb_array_elements($2::jsonb) AS e
         ON CONFLICT (host_id, run_id, seq) DO NOTHING
         RETURNING run_id, seq, ts, received_at
       ), runs AS (
         ${RUN_SUMMARY_UPSERT_SQL("ins", "$1::uuid")}
         RETURNING 1
       ), counted AS (SELECT count(*)::integer AS stored FROM ins)
       SELECT stored, (SELECT count(*) FROM runs) AS runs, CASE WHEN stored > 0 THEN pg_notify($4, $1::text) END AS notified FROM counted`,
      [hostId, json, receivedAt, HOST_CHANGED_CHANNEL],
    );
    const conflicts = await tx.query<{ run_id: string; seq: number }>(
      `SELECT DISTINCT i.run_id, i.seq
         FROM (SELECT e->>'run_id' AS run_id, (e->>'seq')::integer AS seq, e AS body FROM jsonb_array_elements($2::jsonb) AS e) AS i
         JOIN bootstrap_events b ON b.host_id = $1::uuid AND b.run_id = i.run_id AND b.seq = i.seq
        WHERE b.body <> i.body
        ORDER BY i.run_id, i.seq LIMIT 50`,
      [hostId, json],
    );
    if (conflicts.length > 0) throw new EventConflictError(conflicts.map((c) => ({ runId: c.run_id, seq: c.seq })));
    return rows[0]?.stored ?? 0;
  });
}

/** Tell every hub listening on this database that the host's events changed. */
export async function notifyHostChanged(db: Queryable, hostId: string): Promise<void> {
  await db.query("SELECT pg_notify($1, $2)", [HOST_CHANGED_CHANNEL, hostId]);
}

export interface RunSummary {
  runId: string;
  /** The run's start as the hub believes it (see effectiveTs). */
  startedTs: number;
  events: number;
  lastReceivedAt: Date;
}

/** The host's runs, newest first (by their start time, see effectiveTs). */
export async function listRuns(db: Queryable, hostId: string): Promise<RunSummary[]> {
  const rows = await db.query<{ run_id: string; started_ts: number; events: number; last_received_at: Date }>(
    `SELECT run_id, started_ts, events, last_received_at FROM bootstrap_runs WHERE host_id = $1
      ORDER BY started_ts DESC, run_id`,
    [hostId],
  );
  return rows.map((r) => ({ runId: r.run_id, startedTs: Number(r.started_ts), events: r.events, lastReceivedAt: r.last_received_at }));
}

interface RunRow {
  run_id: string;
  events: number;
  max_seq: number;
  last_event_ts: number;
  last_received_at: Date;
  runs: number;
}

/** The newest run (see listRuns) with its counts, and how many runs the host has; null without any. */
async function latestRun(db: Queryable, hostId: string): Promise<RunRow | null> {
  const rows = await db.query<RunRow>(
    `SELECT run_id, events, max_seq, last_event_ts, last_received_at,
            (SELECT count(*)::integer FROM bootstrap_runs WHERE host_id = $1) AS runs
       FROM bootstrap_runs WHERE host_id = $1 ORDER BY started_ts DESC, run_id LIMIT 1`,
    [hostId],
  );
  return rows[0] ?? null;
}

/** Whether the host has any events at all. */
export async function hasEvents(db: Queryable, hostId: string): Promise<boolean> {
  const rows = await db.query<{ one: number }>("SELECT 1 AS one FROM bootstrap_events WHERE host_id = $1 LIMIT 1", [hostId]);
  return rows.length > 0;
}

/** One run's events in sequence order, however they arrived (all of them: for tests and tools, not the status). */
export async function listRunEvents(db: Queryable, hostId: string, runId: string): Promise<StoredEvent[]> {
  const rows = await db.query<{ body: BootstrapEvent; received_at: Date }>(
    "SELECT body, received_at FROM bootstrap_events WHERE host_id = $1 AND run_id = $2 ORDER BY seq",
    [hostId, runId],
  );
  return rows.map((r) => ({ event: r.body, receivedAt: r.received_at }));
}

/**
 * What the status of a run needs, whatever the run's size: the few events
 * that decide it (see `digestEvents` in status.ts, which is the same
 * selection in TypeScript) and counts. Two queries; memory bounded by the
 * number of distinct steps, not events.
 */
export interface RunDigest {
  /** The deciding events, in seq order. */
  events: StoredEvent[];
  count: number;
  maxSeq: number;
  /** Latest effective event time (see effectiveTs). */
  lastEventTs: number;
  lastReceivedAt: Date;
}

/**
 * The host's latest run (see listRuns) as a digest, and how many runs the
 * host has; null when it has none. A few index lookups, whatever the run's size.
 */
export async function readLatestRunDigest(db: Queryable, hostId: string): Promise<{ digest: RunDigest; runs: number } | null> {
  const run = await latestRun(db, hostId);
  if (!run) return null;
  const marks = await db.query<{ seq: number | null }>(
    `SELECT max(seq) AS seq FROM bootstrap_events WHERE host_id = $1 AND run_id = $2 AND type = 'run_start'
     UNION ALL SELECT max(seq) FROM bootstrap_events WHERE host_id = $1 AND run_id = $2 AND type = 'progress'
     UNION ALL SELECT max(seq) FROM bootstrap_events WHERE host_id = $1 AND run_id = $2 AND type = 'run_end'
     UNION ALL SELECT min(seq) FROM bootstrap_events WHERE host_id = $1 AND run_id = $2 AND type = 'step_end' AND body->>'outcome' = 'failed'
     UNION ALL SELECT min(seq) FROM bootstrap_events WHERE host_id = $1 AND run_id = $2 AND type IN ('step_start', 'step_end') GROUP BY type, body->>'step'
     UNION ALL SELECT max(seq) FROM bootstrap_events WHERE host_id = $1 AND run_id = $2 AND type IN ('step_start', 'step_end') GROUP BY type, body->>'step'`,
    [hostId, run.run_id],
  );
  const seqs = [...new Set(marks.flatMap((m) => (m.seq === null ? [] : [m.seq])))];
  const rows = await db.query<{ body: BootstrapEvent; received_at: Date }>(
    "SELECT body, received_at FROM bootstrap_events WHERE host_id = $1 AND run_id = $2 AND seq = ANY($3::integer[]) ORDER BY seq",
    [hostId, run.run_id, seqs],
  );
  return {
    runs: run.runs,
    digest: {
      events: rows.map((r) => ({ event: r.body, receivedAt: r.received_at })),
      count: run.events,
      maxSeq: run.max_seq,
      lastEventTs: Number(run.last_event_ts),
      lastReceivedAt: run.last_received_at,
    },
  };
}

export type { Db };
