/**
 * Host credentials. The bootstrap token in user-data is readable by anything
 * on the VM that reaches the cloud's metadata service, for as long as the VM
 * lives, so it is single use: on first contact the host's stub exchanges it
 * (`POST <host>/credential`) for a host credential of its own: 32 random
 * bytes, stored here only as a sha256, kept by the host in a 0600 file.
 * After the exchange the token is refused everywhere, and every further
 * attempt to exchange or use it is refused and recorded for the operator.
 *
 * Rotation: each credential carries `rotate_after` (the hub's schedule).
 * From then on the same route, called with the credential, issues a
 * successor; the old one stays valid for a short grace, or until the
 * successor is first used, whichever comes first (a host that lost the
 * answer can still ask again). `revokeHostCredentials()` ends every
 * credential and token of a host (the hub's stop, delete and deprovision).
 */
import { randomBytes, timingSafeEqual } from "node:crypto";
import type { Db, Queryable } from "./db.js";
import {
  type CredentialLogEntry,
  findCredential,
  findToken,
  insertCredential,
  listCredentialLog,
  listHostCredentials,
  listHostTokens,
  logCredentialEvent,
  markTokenExchanged,
  recordCredentialUse,
  revokeCredentials,
  revokeHostTokens,
  type StoredCredential,
  supersedeCredential,
} from "./store.js";
import { hashToken, TOKEN_RE, verifyToken } from "./tokens.js";

/** Every host credential starts with this (tells it from a bootstrap token at a glance, and to secret scanners). */
export const CREDENTIAL_PREFIX = "cchc_";
/** `cchc_` + base64url of 32 bytes. */
export const CREDENTIAL_RE = /^cchc_[A-Za-z0-9_-]{43}$/;
const CREDENTIAL_BYTES = 32;

/** A credential is due for rotation this long after it was issued (default). */
export const DEFAULT_ROTATE_AFTER_MS = 7 * 24 * 60 * 60 * 1000;
/** How long a rotated credential stays valid when its successor is not used (default). */
export const DEFAULT_ROTATION_GRACE_MS = 60 * 60 * 1000;

export interface CredentialPolicy {
  rotateAfterMs?: number;
  graceMs?: number;
}

/** Who called, for the log: the caller's address as the app sees it. */
export interface CallContext {
  now?: Date;
  address?: string | null;
}

export type HostAuthVerdict =
  | { ok: true; kind: "token" | "credential"; credential?: StoredCredential }
  | { ok: false; status: 401 | 403; code: HostAuthCode; message: string };

export type HostAuthCode =
  | "missing"
  | "malformed"
  | "unknown_token"
  | "token_expired"
  | "token_revoked"
  | "token_already_exchanged"
  | "unknown_credential"
  | "credential_revoked"
  | "credential_superseded"
  | "foreign_host";

export interface CredentialGrant {
  /** The new credential (shown once), or null when the presented one is not due for rotation. */
  credential: string | null;
  rotateAfter: Date;
}

function refuse(status: 401 | 403, code: HostAuthCode, message: string): HostAuthVerdict & { ok: false } {
  return { ok: false, status, code, message };
}

function newCredential(): string {
  return `${CREDENTIAL_PREFIX}${randomBytes(CREDENTIAL_BYTES).toString("base64url")}`;
}

function sameHash(a: string, b: string): boolean {
  return timingSafeEqual(Buffer.from(a, "hex"), Buffer.from(b, "hex"));
}

/** Check a presented credential (read-only). */
async function checkCredential(db: Queryable, hostId: string, credential: string, now: Date): Promise<HostAuthVerdict> {
  const presented = hashToken(credential);
  const stored = await findCredential(db, presented);
  if (!stored || !sameHash(stored.credentialHash, presented)) return refuse(401, "unknown_credential", "host credential unknown");
  if (stored.hostId !== hostId) return refuse(403, "foreign_host", "credential belongs to another host");
  if (stored.revokedAt) return refuse(401, "credential_revoked", `host credential revoked (${stored.revokedWhy ?? "by the hub"})`);
  if (stored.graceUntil && stored.graceUntil.getTime() <= now.getTime()) {
    return refuse(401, "credential_superseded", "host credential was rotated and its grace has ended");
  }
  return { ok: true, kind: "credential", credential: stored };
}

/** Check a presented bootstrap token, and record a replay of an exchanged one. */
async function checkToken(db: Queryable, hostId: string, token: string, now: Date, address: string | null): Promise<HostAuthVerdict> {
  const verdict = await verifyToken(db, hostId, token, now);
  if (verdict.ok) return { ok: true, kind: "token" };
  switch (verdict.reason) {
    case "exchanged":
      await logCredentialEvent(db, hostId, { at: now, kind: "replay", address, detail: "the user-data bootstrap token was presented after its exchange" });
      return refuse(401, "token_already_exchanged", "bootstrap token already exchanged for a host credential; it is single use");
    case "expired":
      return refuse(401, "token_expired", "bootstrap token expired");
    case "revoked":
      return refuse(401, "token_revoked", "bootstrap token revoked");
    case "foreign host":
      return refuse(403, "foreign_host", "token belongs to another host");
    case "missing":
      return refuse(401, "missing", "no credential: send Authorization: Bearer <host credential>");
    case "malformed":
      return refuse(401, "malformed", "malformed bearer credential");
    default:
      return refuse(401, "unknown_token", "bootstrap token unknown");
  }
}

/**
 * May this bearer speak for the host on its routes (config, secrets,
 * events, bootstrap.py's checksum)? A host credential (valid, not revoked,
 * in its grace if rotated), or a bootstrap token that was never exchanged
 * (the first contact, and older stubs). Using a credential is recorded;
 * the first use of a rotated-to credential ends its predecessor's grace.
 */
export async function authorizeHost(db: Db, hostId: string, bearer: string | null, ctx: CallContext = {}): Promise<HostAuthVerdict> {
  const now = ctx.now ?? new Date();
  if (!bearer) return refuse(401, "missing", "no credential: send Authorization: Bearer <host credential>");
  if (CREDENTIAL_RE.test(bearer)) {
    const verdict = await checkCredential(db, hostId, bearer, now);
    if (verdict.ok && verdict.credential) await recordCredentialUse(db, verdict.credential, now);
    return verdict;
  }
  if (!TOKEN_RE.test(bearer)) return refuse(401, "malformed", "malformed bearer credential");
  return checkToken(db, hostId, bearer, now, ctx.address ?? null);
}

/**
 * `POST <host>/credential`: a never-exchanged bootstrap token → a new host
 * credential (the token is spent; the host's earlier credentials are
 * revoked: a new exchange is a new identity). A host credential → a
 * successor when its rotate_after has passed, else `credential: null`.
 * Refusals are verdicts, never exceptions; every outcome is logged.
 */
export async function exchangeOrRotate(
  db: Db,
  hostId: string,
  bearer: string | null,
  ctx: CallContext & CredentialPolicy = {},
): Promise<{ ok: true; grant: CredentialGrant } | (HostAuthVerdict & { ok: false })> {
  const now = ctx.now ?? new Date();
  const address = ctx.address ?? null;
  const rotateAfter = new Date(now.getTime() + (ctx.rotateAfterMs ?? DEFAULT_ROTATE_AFTER_MS));
  if (bearer && CREDENTIAL_RE.test(bearer)) {
    const verdict = await checkCredential(db, hostId, bearer, now);
    if (!verdict.ok) return verdict;
    const current = verdict.credential!;
    if (current.rotateAfter.getTime() > now.getTime() && current.supersededAt === null) {
      await recordCredentialUse(db, current, now);
      return { ok: true, grant: { credential: null, rotateAfter: current.rotateAfter } };
    }
    const credential = newCredential();
    await db.transaction(async (tx) => {
      // A successor issued before and never used (its answer was lost) is replaced by this one.
      await revokeCredentials(tx, hostId, now, "replaced by a newer rotation", current.credentialHash);
      await supersedeCredential(tx, current.credentialHash, now, new Date(now.getTime() + (ctx.graceMs ?? DEFAULT_ROTATION_GRACE_MS)));
      await insertCredential(tx, { credentialHash: hashToken(credential), hostId, createdAt: now, rotateAfter });
      await logCredentialEvent(tx, hostId, { at: now, kind: "rotate", address, detail: "host credential rotated on schedule" });
    });
    return { ok: true, grant: { credential, rotateAfter } };
  }
  if (bearer && !TOKEN_RE.test(bearer)) return refuse(401, "malformed", "malformed bearer credential");
  const verdict = await checkToken(db, hostId, bearer ?? "", now, address);
  if (!verdict.ok) {
    if (verdict.code !== "token_already_exchanged" && verdict.code !== "missing") {
      await logCredentialEvent(db, hostId, { at: now, kind: "refused", address, detail: `exchange refused: ${verdict.code}` });
    }
    return verdict;
  }
  const credential = newCredential();
  const won = await db.transaction(async (tx) => {
    if (!(await markTokenExchanged(tx, hashToken(bearer!), now, address))) return false;
    await revokeCredentials(tx, hostId, now, "replaced by a new token exchange");
    await insertCredential(tx, { credentialHash: hashToken(credential), hostId, createdAt: now, rotateAfter });
    await logCredentialEvent(tx, hostId, { at: now, kind: "exchange", address, detail: "bootstrap token exchanged for a host credential" });
    return true;
  });
  if (!won) {
    // Another request exchanged it between our check and our update.
    await logCredentialEvent(db, hostId, { at: now, kind: "replay", address, detail: "the user-data bootstrap token was presented after its exchange" });
    return refuse(401, "token_already_exchanged", "bootstrap token already exchanged for a host credential; it is single use");
  }
  return { ok: true, grant: { credential, rotateAfter } };
}

/**
 * End every credential and bootstrap token of a host (the hub's lifecycle:
 * stop, delete, deprovision). Returns how many of each were revoked; the
 * revocation is logged.
 */
export async function revokeHostCredentials(db: Db, hostId: string, opts: { now?: Date; why?: string } = {}): Promise<{ credentials: number; tokens: number }> {
  const now = opts.now ?? new Date();
  const why = opts.why ?? "revoked by the hub";
  return db.transaction((tx) => revokeHostCredentialsIn(tx, hostId, now, why));
}

/** The same inside a transaction the caller holds (the hub's lifecycle: stop, delete, deprovision). */
export async function revokeHostCredentialsIn(tx: Queryable, hostId: string, now: Date, why: string): Promise<{ credentials: number; tokens: number }> {
  const credentials = await revokeCredentials(tx, hostId, now, why);
  const tokens = await revokeHostTokens(tx, hostId, now);
  await logCredentialEvent(tx, hostId, { at: now, kind: "revoke", address: null, detail: `${why}: ${credentials} credential(s), ${tokens} token(s)` });
  return { credentials, tokens };
}

/** What the operator sees about a host's credentials: no hashes, only times and the log. */
export interface HostCredentialRecord {
  host_id: string;
  tokens: { created_at: string; expires_at: string; revoked_at: string | null; exchanged_at: string | null; exchanged_from: string | null }[];
  credentials: {
    created_at: string;
    rotate_after: string;
    superseded_at: string | null;
    grace_until: string | null;
    first_used_at: string | null;
    last_used_at: string | null;
    revoked_at: string | null;
    revoked_why: string | null;
  }[];
  /** Refused replays of an exchanged token (the count in the log window). */
  replays: number;
  log: { at: string; kind: CredentialLogEntry["kind"]; address: string | null; detail: string }[];
}

const iso = (d: Date | null | undefined) => (d ? d.toISOString() : null);

export async function hostCredentialRecord(db: Queryable, hostId: string, opts: { logLimit?: number } = {}): Promise<HostCredentialRecord> {
  const [tokens, credentials, log] = await Promise.all([
    listHostTokens(db, hostId),
    listHostCredentials(db, hostId),
    listCredentialLog(db, hostId, opts.logLimit ?? 100),
  ]);
  return {
    host_id: hostId,
    tokens: tokens.map((t) => ({
      created_at: t.createdAt.toISOString(),
      expires_at: t.expiresAt.toISOString(),
      revoked_at: iso(t.revokedAt),
      exchanged_at: iso(t.exchangedAt),
      exchanged_from: t.exchangedFrom ?? null,
    })),
    credentials: credentials.map((c) => ({
      created_at: c.createdAt.toISOString(),
      rotate_after: c.rotateAfter.toISOString(),
      superseded_at: iso(c.supersededAt),
      grace_until: iso(c.graceUntil),
      first_used_at: iso(c.firstUsedAt),
      last_used_at: iso(c.lastUsedAt),
      revoked_at: iso(c.revokedAt),
      revoked_why: c.revokedWhy,
    })),
    replays: log.filter((e) => e.kind === "replay").length,
    log: log.map((e) => ({ at: e.at.toISOString(), kind: e.kind, address: e.address, detail: e.detail })),
  };
}

/** Whether a token (by its text) was exchanged already (tests and tools). */
export async function tokenExchanged(db: Queryable, token: string): Promise<boolean> {
  return Boolean((await findToken(db, hashToken(token)))?.exchangedAt);
}
