/**
 * Host credentials. The bootstrap token in user-data is readable by anything
 * on the VM that reaches the cloud's metadata service, for as long as the VM
 * lives, so it is single use: on first contact the host's stub exchanges it
 * (`POST <host>/credential`) for a host credential of its own, stored here
 * only as a sha256 and kept by the host in a 0600 file. After the exchange
 * the token is refused everywhere, and every further attempt to exchange or
 * use it is refused and recorded for the operator.
 *
 * The exchange is idempotent for the host that made it. The stub chooses the
 * credential itself (32 random bytes, written 0600 before it asks) and sends
 * only its sha256 (`{"credential_sha256": …}`) with the token; the hub
 * stores that hash on the credential and on the token, and never makes or
 * sends a secret. The same token with the same hash again (the answer was
 * lost) gets the same acknowledgement, logged as a `retry`; the token with
 * any other hash is a `replay`, refused `token_already_exchanged`. A stub of
 * the previous version sends no hash and gets a hub-made credential in the
 * answer, once, as before (no retry possible for it).
 *
 * Rotation: each credential carries `rotate_after` (the hub's schedule).
 * From then on the same route, called with the credential, issues a
 * successor (hub-made); the old one stays valid for a short grace, or until
 * the successor is first used, whichever comes first (a host that lost the
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
  | { ok: false; status: 401 | 403 | 409; code: HostAuthCode; message: string };

/** The sha256 (lowercase hex) of a host-chosen credential, as sent in the exchange. */
export const CREDENTIAL_SHA256_RE = /^[0-9a-f]{64}$/;

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
  | "foreign_host"
  | "credential_in_use";

export interface CredentialGrant {
  /** A hub-made credential (shown once), or null: not due for rotation, or the host chose its own. */
  credential: string | null;
  rotateAfter: Date;
  /** The host-chosen credential's sha256 the token was exchanged for: now (`new`) or before (`retry`). */
  chosen?: { sha256: string; outcome: "new" | "retry" };
}

function refuse(status: 401 | 403 | 409, code: HostAuthCode, message: string): HostAuthVerdict & { ok: false } {
  return { ok: false, status, code, message };
}

const REPLAY_DETAIL = "the user-data bootstrap token was presented after its exchange";

function replayRefusal(): HostAuthVerdict & { ok: false } {
  return refuse(401, "token_already_exchanged", "bootstrap token already exchanged for a host credential; it is single use");
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
      await logCredentialEvent(db, hostId, { at: now, kind: "replay", address, detail: REPLAY_DETAIL });
      return replayRefusal();
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
 * The token was exchanged already. For the host-chosen credential it was
 * exchanged for (the same sha256 again: the host lost the answer), the same
 * acknowledgement, logged as a retry, as long as that credential and the
 * token still stand. Anything else is a replay, refused and logged.
 */
async function retryOrReplay(
  db: Queryable,
  hostId: string,
  token: string,
  chosenSha256: string | null,
  now: Date,
  address: string | null,
): Promise<{ ok: true; grant: CredentialGrant } | (HostAuthVerdict & { ok: false })> {
  const stored = await findToken(db, hashToken(token));
  if (!chosenSha256 || !stored?.exchangedFor || !sameHash(stored.exchangedFor, chosenSha256)) {
    await logCredentialEvent(db, hostId, { at: now, kind: "replay", address, detail: REPLAY_DETAIL });
    return replayRefusal();
  }
  const failed = async (v: HostAuthVerdict & { ok: false }) => {
    await logCredentialEvent(db, hostId, { at: now, kind: "refused", address, detail: `exchange retry refused: ${v.code}` });
    return v;
  };
  if (stored.revokedAt) return failed(refuse(401, "token_revoked", "bootstrap token revoked"));
  const credential = await findCredential(db, chosenSha256);
  if (!credential || credential.hostId !== hostId) return failed(refuse(401, "unknown_credential", "host credential unknown"));
  if (credential.revokedAt) return failed(refuse(401, "credential_revoked", `host credential revoked (${credential.revokedWhy ?? "by the hub"})`));
  if (credential.graceUntil && credential.graceUntil.getTime() <= now.getTime()) {
    return failed(refuse(401, "credential_superseded", "host credential was rotated and its grace has ended"));
  }
  await logCredentialEvent(db, hostId, {
    at: now,
    kind: "retry",
    address,
    detail: "the exchange was asked again for the same host-chosen credential (its answer was lost); acknowledged again",
  });
  return { ok: true, grant: { credential: null, rotateAfter: credential.rotateAfter, chosen: { sha256: chosenSha256, outcome: "retry" } } };
}

/**
 * `POST <host>/credential`: a never-exchanged bootstrap token → the host's
 * credential: the one whose sha256 the host sent (`chosenSha256`), or, from
 * a stub of the previous version that sends none, a new hub-made one (the
 * token is spent; the host's earlier credentials are revoked: a new exchange
 * is a new identity). The same token and sha256 again → the same answer
 * (retry). A host credential → a successor when its rotate_after has passed,
 * else `credential: null`. Refusals are verdicts, never exceptions; every
 * outcome is logged.
 */
export async function exchangeOrRotate(
  db: Db,
  hostId: string,
  bearer: string | null,
  ctx: CallContext & CredentialPolicy & { chosenSha256?: string | null } = {},
): Promise<{ ok: true; grant: CredentialGrant } | (HostAuthVerdict & { ok: false })> {
  const now = ctx.now ?? new Date();
  const address = ctx.address ?? null;
  const chosen = ctx.chosenSha256 ?? null;
  if (chosen !== null && !CREDENTIAL_SHA256_RE.test(chosen)) throw new TypeError("chosenSha256 must be 64 lowercase hex characters");
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
  const verdict = await verifyToken(db, hostId, bearer, now);
  if (!verdict.ok && verdict.reason === "exchanged") return retryOrReplay(db, hostId, bearer!, chosen, now, address);
  if (!verdict.ok) {
    const refused = await checkToken(db, hostId, bearer ?? "", now, address);
    if (!refused.ok && refused.code !== "missing") {
      await logCredentialEvent(db, hostId, { at: now, kind: "refused", address, detail: `exchange refused: ${refused.code}` });
    }
    return refused as HostAuthVerdict & { ok: false };
  }
  const credential = chosen === null ? newCredential() : null;
  const credentialHash = chosen ?? hashToken(credential!);
  const outcome = await db.transaction(async (tx): Promise<"won" | "lost" | "in_use"> => {
    // A sha256 that is some credential's already (this host's older one, another host's): refused, nothing changed.
    if (chosen !== null && (await findCredential(tx, chosen))) return "in_use";
    if (!(await markTokenExchanged(tx, hashToken(bearer!), now, address, chosen))) return "lost";
    await revokeCredentials(tx, hostId, now, "replaced by a new token exchange");
    await insertCredential(tx, { credentialHash, hostId, createdAt: now, rotateAfter });
    const detail =
      chosen === null
        ? "bootstrap token exchanged for a hub-made host credential (a stub without credential_sha256)"
        : "bootstrap token exchanged for the host-chosen credential";
    await logCredentialEvent(tx, hostId, { at: now, kind: "exchange", address, detail });
    return "won";
  });
  if (outcome === "in_use") {
    // The host's own concurrent request may have exchanged the token for this very sha256 a moment ago.
    if ((await findToken(db, hashToken(bearer!)))?.exchangedFor === chosen) return retryOrReplay(db, hostId, bearer!, chosen, now, address);
    await logCredentialEvent(db, hostId, { at: now, kind: "refused", address, detail: "exchange refused: credential_in_use" });
    return refuse(
      409,
      "credential_in_use",
      "that credential_sha256 belongs to a credential already; choose a new credential (32 fresh random bytes) and ask again",
    );
  }
  // Another request exchanged it between our check and our update: the same host's (a retry) or a replay.
  if (outcome === "lost") return retryOrReplay(db, hostId, bearer!, chosen, now, address);
  return { ok: true, grant: { credential, rotateAfter, ...(chosen === null ? {} : { chosen: { sha256: chosen, outcome: "new" as const } }) } };
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
