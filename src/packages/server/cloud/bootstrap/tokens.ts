/**
 * Per-host bootstrap tokens. The token is 32 random bytes (base64url) handed
 * to the host once, inside its stub; the database only ever holds its
 * sha256. Issuing a token revokes the host's older ones, and a token only
 * speaks for the host it was issued to. It is single use: the host's stub
 * exchanges it for a host credential (credentials.ts), after which it is
 * refused everywhere.
 */
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import type { Db, Queryable } from "./db.js";
import { findToken, insertToken, revokeHostTokens } from "./store.js";

export const DEFAULT_TOKEN_TTL_MS = 24 * 60 * 60 * 1000;
const TOKEN_BYTES = 32;
/** base64url of 32 bytes; anything else is rejected before touching the database. */
export const TOKEN_RE = /^[A-Za-z0-9_-]{43}$/;

export function hashToken(token: string): string {
  return createHash("sha256").update(token, "utf8").digest("hex");
}

export interface IssuedToken {
  token: string;
  expiresAt: Date;
}

export async function issueToken(db: Db, hostId: string, opts: { ttlMs?: number; now?: Date } = {}): Promise<IssuedToken> {
  return db.transaction((tx) => issueTokenIn(tx, hostId, opts));
}

/** issueToken inside the caller's transaction (provisioning stores host, secrets, token and `pending` together). */
export async function issueTokenIn(tx: Queryable, hostId: string, opts: { ttlMs?: number; now?: Date } = {}): Promise<IssuedToken> {
  const now = opts.now ?? new Date();
  const expiresAt = new Date(now.getTime() + (opts.ttlMs ?? DEFAULT_TOKEN_TTL_MS));
  const token = randomBytes(TOKEN_BYTES).toString("base64url");
  await revokeHostTokens(tx, hostId, now);
  await insertToken(tx, { tokenHash: hashToken(token), hostId, createdAt: now, expiresAt });
  return { token, expiresAt };
}

export async function revokeTokens(db: Db, hostId: string, now = new Date()): Promise<number> {
  return revokeHostTokens(db, hostId, now);
}

export type TokenVerdict =
  | { ok: true }
  | { ok: false; status: 401 | 403; reason: "missing" | "malformed" | "unknown" | "expired" | "revoked" | "exchanged" | "foreign host" };

/** Check a presented token against the host it claims to speak for. */
export async function verifyToken(db: Queryable, hostId: string, token: string | null, now = new Date()): Promise<TokenVerdict> {
  if (!token) return { ok: false, status: 401, reason: "missing" };
  if (!TOKEN_RE.test(token)) return { ok: false, status: 401, reason: "malformed" };
  const presented = hashToken(token);
  const stored = await findToken(db, presented);
  // The lookup is by hash already; compare again in constant time so no code
  // path decides on a byte-by-byte comparison of secret material.
  if (!stored || !timingSafeEqual(Buffer.from(stored.tokenHash, "hex"), Buffer.from(presented, "hex"))) {
    return { ok: false, status: 401, reason: "unknown" };
  }
  if (stored.hostId !== hostId) return { ok: false, status: 403, reason: "foreign host" };
  // Single use: once exchanged for a host credential (credentials.ts), the token opens nothing.
  if (stored.exchangedAt) return { ok: false, status: 401, reason: "exchanged" };
  if (stored.revokedAt) return { ok: false, status: 401, reason: "revoked" };
  if (stored.expiresAt.getTime() <= now.getTime()) return { ok: false, status: 401, reason: "expired" };
  return { ok: true };
}

/** The token from an `Authorization: Bearer <token>` header, or null. */
export function bearerToken(header: string | undefined): string | null {
  const m = /^Bearer ([^\s]+)$/i.exec(header?.trim() ?? "");
  return m ? m[1]! : null;
}
