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
}

interface TokenRow {
  token_hash: string;
  host_id: string;
  created_at: Date;
  expires_at: Date;
  revoked_at: Date | null;
}

function tokenFromRow(r: TokenRow): StoredToken {
  return { tokenHash: r.token_hash, hostId: r.host_id, createdAt: r.created_at, expiresAt: r.expires_at, revokedAt: r.revoked_at };
}

/** Revoke every live token of the host; returns how many were revoked. */
export async function revokeHostTokens(db: Queryable, hostId: string, now: Date): Promise<number> {
  const rows = await db.query<{ token_hash: string }>(
    "UPDATE bootstrap_tokens SET revoked_at = $2 WHERE host_id = $1 AND revoked_at IS NULL RETURNING token_hash",
    [hostId, now],
  );
  return rows.length;
}

export async function insertToken(db: Queryable, t: Omit<StoredToken, "revokedAt">): Promise<void> {
  await db.query("INSERT INTO bootstrap_tokens (token_hash, host_id, created_at, expires_at) VALUES ($1, $2, $3, $4)", [
    t.tokenHash,
    t.hostId,
    t.createdAt,
    t.expiresAt,
  ]);
}

export async function findToken(db: Queryable, tokenHash: string): Promise<StoredToken | null> {
  const rows = await db.query<TokenRow>(
    "SELECT token_hash, host_id, created_at, expires_at, revoked_at FROM bootstrap_tokens WHERE token_hash = $1",
    [tokenHash],
  );
  return rows[0] ? tokenFromRow(rows[0]) : null;
}

export async function listHostTokens(db: Queryable, hostId: string): Promise<StoredToken[]> {
  const rows = await db.query<TokenRow>(
    "SELECT token_hash, host_id, created_at, expires_at, revoked_at FROM bootstrap_tokens WHERE host_id = $1 ORDER BY created_at",
    [hostId],
  );
  return rows.map(tokenFromRow);
}

// --- secrets ---------------------------------------------------------------------------

export async function saveSecret(db: Queryable, hostId: string, name: string, value: string): Promise<void> {
  await db.query(
    `INSERT INTO bootstrap_secrets (host_id, name, value) VALUES ($1, $2, $3)
     ON CONFLICT (host_id, name) DO UPDATE SET value = EXCLUDED.value`,
    [hostId, name, value],
  );
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
 * Store a batch; events already stored (same host, run and seq) are left as
 * they are, so a replayed batch changes nothing. When anything was new, every
 * hub listening on HOST_CHANGED_CHANNEL hears the host id (same statement, so
 * one round trip). Returns how many events were new.
 */
export async function insertEvents(db: Queryable, hostId: string, events: readonly BootstrapEvent[], receivedAt: Date): Promise<number> {
  const rows = await db.query<{ stored: number }>(
    `WITH ins AS (
       INSERT INTO bootstrap_events (host_id, run_id, seq, type, ts, body, received_at)
       SELECT $1::uuid, e->>'run_id', (e->>'seq')::integer, e->>'type', (e->>'ts')::double precision, e, $3::timestamptz
         FROM jsonb_array_elements($2::jsonb) AS e
       ON CONFLICT (host_id, run_id, seq) DO NOTHING
       RETURNING seq
     ), counted AS (SELECT count(*)::integer AS stored FROM ins)
     SELECT stored, CASE WHEN stored > 0 THEN pg_notify($4, $1::text) END AS notified FROM counted`,
    [hostId, JSON.stringify(events), receivedAt, HOST_CHANGED_CHANNEL],
  );
  return rows[0]?.stored ?? 0;
}

/** Tell every hub listening on this database that the host's events changed. */
export async function notifyHostChanged(db: Queryable, hostId: string): Promise<void> {
  await db.query("SELECT pg_notify($1, $2)", [HOST_CHANGED_CHANNEL, hostId]);
}

export interface RunSummary {
  runId: string;
  startedTs: number;
  events: number;
  lastReceivedAt: Date;
}

/** The host's runs, newest first (by the host's own start time). */
export async function listRuns(db: Queryable, hostId: string): Promise<RunSummary[]> {
  const rows = await db.query<{ run_id: string; started_ts: number; events: number; last_received_at: Date }>(
    `SELECT run_id, min(ts) AS started_ts, count(*)::integer AS events, max(received_at) AS last_received_at
       FROM bootstrap_events WHERE host_id = $1
      GROUP BY run_id ORDER BY min(ts) DESC, run_id`,
    [hostId],
  );
  return rows.map((r) => ({ runId: r.run_id, startedTs: r.started_ts, events: r.events, lastReceivedAt: r.last_received_at }));
}

/** One run's events in sequence order, however they arrived. */
export async function listRunEvents(db: Queryable, hostId: string, runId: string): Promise<StoredEvent[]> {
  const rows = await db.query<{ body: BootstrapEvent; received_at: Date }>(
    "SELECT body, received_at FROM bootstrap_events WHERE host_id = $1 AND run_id = $2 ORDER BY seq",
    [hostId, runId],
  );
  return rows.map((r) => ({ event: r.body, receivedAt: r.received_at }));
}

export type { Db };
