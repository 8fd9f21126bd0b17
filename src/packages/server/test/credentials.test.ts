/**
 * Host credentials (credentials.ts) on PGlite and a real PostgreSQL: the
 * single-use exchange of the bootstrap token, the refusal and record of a
 * replay, rotation on the hub's schedule with its grace, and revocation.
 */
import { randomUUID } from "node:crypto";
import { describe, expect, it } from "vitest";
import {
  authorizeHost,
  CREDENTIAL_RE,
  DEFAULT_ROTATE_AFTER_MS,
  exchangeOrRotate,
  hostCredentialRecord,
  revokeHostCredentials,
  tokenExchanged,
} from "../cloud/bootstrap/credentials.js";
import { listHostCredentials } from "../cloud/bootstrap/store.js";
import { issueToken } from "../cloud/bootstrap/tokens.js";
import { describeOnDatabases } from "./support/databases.js";

const T0 = new Date("2026-01-01T00:00:00Z");
const at = (ms: number) => new Date(T0.getTime() + ms);
const MIN = 60_000;

describeOnDatabases("host credentials", (h) => {
  async function exchanged(hostId = randomUUID(), policy: { rotateAfterMs?: number; graceMs?: number } = {}) {
    const { token } = await issueToken(h.db, hostId, { now: T0 });
    const r = await exchangeOrRotate(h.db, hostId, token, { now: T0, address: "192.0.2.7", ...policy });
    if (!r.ok) throw new Error(`exchange refused: ${r.code}`);
    return { hostId, token, credential: r.grant.credential!, rotateAfter: r.grant.rotateAfter };
  }

  it("a token is exchanged once for a random credential, stored only hashed, with the hub's rotation time", async () => {
    const { hostId, token, credential, rotateAfter } = await exchanged();
    expect(credential).toMatch(CREDENTIAL_RE);
    expect(Buffer.from(credential.slice(5), "base64url")).toHaveLength(32);
    expect(rotateAfter.getTime() - T0.getTime()).toBe(DEFAULT_ROTATE_AFTER_MS);
    expect(await tokenExchanged(h.db, token)).toBe(true);
    const rows = await h.db.query<{ row: string }>("SELECT row_to_json(c)::text AS row FROM bootstrap_credentials c WHERE host_id = $1", [hostId]);
    expect(rows).toHaveLength(1);
    expect(rows[0]!.row).not.toContain(credential.slice(5));
    const record = await hostCredentialRecord(h.db, hostId);
    expect(record.tokens[0]).toMatchObject({ exchanged_at: T0.toISOString(), exchanged_from: "192.0.2.7" });
    expect(record.log.map((e) => e.kind)).toEqual(["exchange"]);
    expect(JSON.stringify(record)).not.toContain(credential);
  });

  it("a second exchange of the same token is refused, and the replay is recorded for the operator", async () => {
    const { hostId, token } = await exchanged();
    const again = await exchangeOrRotate(h.db, hostId, token, { now: at(MIN), address: "198.51.100.9" });
    expect(again).toMatchObject({ ok: false, status: 401, code: "token_already_exchanged" });
    const record = await hostCredentialRecord(h.db, hostId);
    expect(record.replays).toBe(1);
    expect(record.log[0]).toMatchObject({ kind: "replay", address: "198.51.100.9", at: at(MIN).toISOString() });
    // hammering from the same address within a minute is one entry; another address is another
    await exchangeOrRotate(h.db, hostId, token, { now: at(MIN + 1000), address: "198.51.100.9" });
    await exchangeOrRotate(h.db, hostId, token, { now: at(MIN + 2000), address: "203.0.113.1" });
    expect((await hostCredentialRecord(h.db, hostId)).replays).toBe(2);
  });

  it("after the exchange the token opens nothing; the credential opens the host's routes, only its own", async () => {
    const { hostId, token, credential } = await exchanged();
    expect(await authorizeHost(h.db, hostId, token, { now: at(1) })).toMatchObject({ ok: false, code: "token_already_exchanged" });
    expect(await authorizeHost(h.db, hostId, credential, { now: at(1) })).toMatchObject({ ok: true, kind: "credential" });
    expect(await authorizeHost(h.db, randomUUID(), credential, { now: at(1) })).toMatchObject({ ok: false, status: 403, code: "foreign_host" });
    expect(await authorizeHost(h.db, hostId, `cchc_${"A".repeat(43)}`, { now: at(1) })).toMatchObject({ ok: false, code: "unknown_credential" });
  });

  it("an expired, revoked or never-issued token cannot be exchanged (and the refusal is logged)", async () => {
    const hostId = randomUUID();
    const { token } = await issueToken(h.db, hostId, { now: T0, ttlMs: MIN });
    expect(await exchangeOrRotate(h.db, hostId, token, { now: at(MIN) })).toMatchObject({ ok: false, code: "token_expired" });
    const second = await issueToken(h.db, hostId, { now: T0 });
    await revokeHostCredentials(h.db, hostId, { now: at(1) });
    expect(await exchangeOrRotate(h.db, hostId, second.token, { now: at(2) })).toMatchObject({ ok: false, code: "token_revoked" });
    expect(await exchangeOrRotate(h.db, hostId, "A".repeat(43), { now: at(2) })).toMatchObject({ ok: false, code: "unknown_token" });
    expect(await exchangeOrRotate(h.db, hostId, null, { now: at(2) })).toMatchObject({ ok: false, code: "missing" });
    const kinds = (await hostCredentialRecord(h.db, hostId)).log.map((e) => `${e.kind}:${e.detail}`);
    expect(kinds).toContain("refused:exchange refused: token_expired");
    expect(kinds).toContain("refused:exchange refused: token_revoked");
  });

  it("concurrent exchanges of one token: exactly one credential", async () => {
    const hostId = randomUUID();
    const { token } = await issueToken(h.db, hostId, { now: T0 });
    const results = await Promise.all([1, 2, 3, 4].map(() => exchangeOrRotate(h.db, hostId, token, { now: T0 })));
    expect(results.filter((r) => r.ok)).toHaveLength(1);
    expect(results.filter((r) => !r.ok).map((r) => (r.ok ? "" : r.code))).toEqual(Array(3).fill("token_already_exchanged"));
    expect(await listHostCredentials(h.db, hostId)).toHaveLength(1);
  });

  it("rotation: nothing before rotate_after; then a successor, the old one valid in its grace until the successor is used", async () => {
    const policy = { rotateAfterMs: 10 * MIN, graceMs: 5 * MIN };
    const { hostId, credential } = await exchanged(randomUUID(), policy);
    const early = await exchangeOrRotate(h.db, hostId, credential, { now: at(9 * MIN), ...policy });
    expect(early).toEqual({ ok: true, grant: { credential: null, rotateAfter: at(10 * MIN) } });
    const due = await exchangeOrRotate(h.db, hostId, credential, { now: at(10 * MIN), ...policy });
    if (!due.ok) throw new Error(due.code);
    const next = due.grant.credential!;
    expect(next).toMatch(CREDENTIAL_RE);
    expect(next).not.toBe(credential);
    expect(due.grant.rotateAfter).toEqual(at(20 * MIN));
    // in grace: both work
    expect(await authorizeHost(h.db, hostId, credential, { now: at(11 * MIN) })).toMatchObject({ ok: true });
    // the successor's first use ends the old one's grace
    expect(await authorizeHost(h.db, hostId, next, { now: at(12 * MIN) })).toMatchObject({ ok: true });
    expect(await authorizeHost(h.db, hostId, credential, { now: at(12 * MIN + 1) })).toMatchObject({ ok: false, code: "credential_revoked" });
    const log = (await hostCredentialRecord(h.db, hostId)).log.map((e) => e.kind);
    expect(log).toEqual(["rotate", "exchange"]);
  });

  it("rotation whose answer was lost: the old credential asks again within its grace, and the unused successor is dropped", async () => {
    const policy = { rotateAfterMs: 10 * MIN, graceMs: 5 * MIN };
    const { hostId, credential } = await exchanged(randomUUID(), policy);
    const lost = await exchangeOrRotate(h.db, hostId, credential, { now: at(10 * MIN), ...policy });
    const retry = await exchangeOrRotate(h.db, hostId, credential, { now: at(11 * MIN), ...policy });
    if (!lost.ok || !retry.ok) throw new Error("refused");
    expect(retry.grant.credential).toMatch(CREDENTIAL_RE);
    expect(await authorizeHost(h.db, hostId, lost.grant.credential!, { now: at(11 * MIN) })).toMatchObject({ ok: false, code: "credential_revoked" });
    expect(await authorizeHost(h.db, hostId, retry.grant.credential!, { now: at(11 * MIN) })).toMatchObject({ ok: true });
    // the grace is not extended by asking again: it ends 5 min after the first rotation
    const fresh = await exchanged(randomUUID(), policy);
    await exchangeOrRotate(h.db, fresh.hostId, fresh.credential, { now: at(10 * MIN), ...policy });
    await exchangeOrRotate(h.db, fresh.hostId, fresh.credential, { now: at(14 * MIN), ...policy });
    expect(await authorizeHost(h.db, fresh.hostId, fresh.credential, { now: at(15 * MIN) })).toMatchObject({ ok: false, code: "credential_superseded" });
  });

  it("revokeHostCredentials ends every credential and token of the host, and says so in the record", async () => {
    const { hostId, credential } = await exchanged();
    const { token: unexchanged } = await issueToken(h.db, hostId, { now: at(1) });
    const other = await exchanged();
    expect(await revokeHostCredentials(h.db, hostId, { now: at(2), why: "host stopped" })).toEqual({ credentials: 1, tokens: 1 });
    expect(await authorizeHost(h.db, hostId, credential, { now: at(3) })).toMatchObject({ ok: false, code: "credential_revoked" });
    expect(await authorizeHost(h.db, hostId, unexchanged, { now: at(3) })).toMatchObject({ ok: false, code: "token_revoked" });
    expect(await exchangeOrRotate(h.db, hostId, credential, { now: at(3) })).toMatchObject({ ok: false, code: "credential_revoked" });
    // another host is untouched
    expect(await authorizeHost(h.db, other.hostId, other.credential, { now: at(3) })).toMatchObject({ ok: true });
    const record = await hostCredentialRecord(h.db, hostId);
    expect(record.credentials[0]).toMatchObject({ revoked_at: at(2).toISOString(), revoked_why: "host stopped" });
    expect(record.log[0]).toMatchObject({ kind: "revoke", detail: "host stopped: 1 credential(s), 1 token(s)" });
    expect(await revokeHostCredentials(h.db, hostId, { now: at(4) })).toEqual({ credentials: 0, tokens: 0 });
  });

  it("a new token (re-provisioning) exchanged replaces the host's earlier credential", async () => {
    const { hostId, credential } = await exchanged();
    const { token } = await issueToken(h.db, hostId, { now: at(1) });
    expect(await authorizeHost(h.db, hostId, credential, { now: at(2) })).toMatchObject({ ok: true }); // until the new one is exchanged
    const r = await exchangeOrRotate(h.db, hostId, token, { now: at(3) });
    expect(r.ok).toBe(true);
    expect(await authorizeHost(h.db, hostId, credential, { now: at(4) })).toMatchObject({ ok: false, code: "credential_revoked" });
  });
});

describe("credential format", () => {
  it("is cchc_ and 43 base64url characters", () => {
    expect(CREDENTIAL_RE.test(`cchc_${"a".repeat(43)}`)).toBe(true);
    expect(CREDENTIAL_RE.test(`cchc_${"a".repeat(42)}`)).toBe(false);
    expect(CREDENTIAL_RE.test(`cchc_${"a".repeat(42)}=`)).toBe(false);
    expect(CREDENTIAL_RE.test("a".repeat(48))).toBe(false);
  });
});
