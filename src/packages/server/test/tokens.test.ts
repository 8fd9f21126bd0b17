import { createHash, randomUUID } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Db, openPglite } from "../cloud/bootstrap/db.js";
import { migrate } from "../cloud/bootstrap/migrate.js";
import { listHostTokens } from "../cloud/bootstrap/store.js";
import { bearerToken, DEFAULT_TOKEN_TTL_MS, hashToken, issueToken, revokeTokens, verifyToken } from "../cloud/bootstrap/tokens.js";

let db: Db;
beforeAll(async () => {
  db = await openPglite();
  await migrate(db);
});
afterAll(async () => db.close());

describe("bootstrap tokens", () => {
  it("are 32 random bytes in base64url, valid for 24 h by default", async () => {
    const hostId = randomUUID();
    const now = new Date("2025-03-01T00:00:00Z");
    const { token, expiresAt } = await issueToken(db, hostId, { now });
    expect(token).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(Buffer.from(token, "base64url")).toHaveLength(32);
    expect(expiresAt.getTime() - now.getTime()).toBe(DEFAULT_TOKEN_TTL_MS);
    expect(await verifyToken(db, hostId, token, now)).toEqual({ ok: true });
    const other = await issueToken(db, randomUUID(), { now });
    expect(other.token).not.toBe(token);
  });

  it("expire", async () => {
    const hostId = randomUUID();
    const now = new Date("2025-03-01T00:00:00Z");
    const { token } = await issueToken(db, hostId, { now, ttlMs: 60_000 });
    expect(await verifyToken(db, hostId, token, new Date(now.getTime() + 59_999))).toEqual({ ok: true });
    expect(await verifyToken(db, hostId, token, new Date(now.getTime() + 60_000))).toEqual({ ok: false, status: 401, reason: "expired" });
  });

  it("are revoked explicitly and by issuing a new one", async () => {
    const hostId = randomUUID();
    const first = await issueToken(db, hostId);
    const second = await issueToken(db, hostId);
    expect(await verifyToken(db, hostId, first.token)).toMatchObject({ ok: false, status: 401, reason: "revoked" });
    expect(await verifyToken(db, hostId, second.token)).toEqual({ ok: true });
    expect(await revokeTokens(db, hostId)).toBe(1);
    expect(await verifyToken(db, hostId, second.token)).toMatchObject({ ok: false, status: 401, reason: "revoked" });
  });

  it("speak only for their own host", async () => {
    const a = randomUUID();
    const b = randomUUID();
    const ta = await issueToken(db, a);
    await issueToken(db, b);
    expect(await verifyToken(db, b, ta.token)).toEqual({ ok: false, status: 403, reason: "foreign host" });
  });

  it("reject missing, malformed and unknown tokens", async () => {
    const hostId = randomUUID();
    expect(await verifyToken(db, hostId, null)).toMatchObject({ status: 401, reason: "missing" });
    expect(await verifyToken(db, hostId, "short")).toMatchObject({ status: 401, reason: "malformed" });
    expect(await verifyToken(db, hostId, "A".repeat(43))).toMatchObject({ status: 401, reason: "unknown" });
  });

  it("are stored only as their sha256", async () => {
    const hostId = randomUUID();
    const { token } = await issueToken(db, hostId);
    const [stored] = await listHostTokens(db, hostId);
    expect(stored?.tokenHash).toBe(createHash("sha256").update(token).digest("hex"));
    expect(stored?.tokenHash).toBe(hashToken(token));
    // Nothing in any column of the table (nor the whole database dump of it) contains the token.
    const rows = await db.query<{ row: string }>("SELECT row_to_json(t)::text AS row FROM bootstrap_tokens t");
    expect(rows.length).toBeGreaterThan(0);
    for (const r of rows) expect(r.row).not.toContain(token);
  });

  it("are read from an Authorization: Bearer header", () => {
    expect(bearerToken("Bearer abc")).toBe("abc");
    expect(bearerToken("bearer abc")).toBe("abc");
    expect(bearerToken("Basic abc")).toBeNull();
    expect(bearerToken(undefined)).toBeNull();
    expect(bearerToken("Bearer a b")).toBeNull();
  });
});
