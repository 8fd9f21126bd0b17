/**
 * The idempotent exchange, over HTTP and at the store, on PGlite and a real
 * PostgreSQL: the host chooses its credential and sends its sha256 with the
 * token; the same token and sha256 again (a lost answer) is acknowledged
 * again and logged as a retry; any other sha256 is a replay, refused and
 * logged as today; a stub of the previous version (no body) still gets a
 * hub-made credential; and a fast-check property over hostile bodies (each a
 * 400 naming the field, nothing changed).
 */
import { createHash, randomBytes } from "node:crypto";
import fc from "fast-check";
import { afterAll, beforeAll, expect, it } from "vitest";
import { CREDENTIAL_RE, exchangeOrRotate, type HostCredentialRecord, revokeHostCredentials, tokenExchanged } from "../cloud/bootstrap/credentials.js";
import { type RunningHub, startHub } from "../cloud/bootstrap/hub.js";
import { EXCHANGE_BODY_MAX_BYTES } from "../cloud/bootstrap/routes.js";
import { issueToken } from "../cloud/bootstrap/tokens.js";
import { describeOnDatabases } from "./support/databases.js";
import { hostRecord } from "./support/fixtures.js";
import { type ManifestServer, serveGoodManifests, startManifestServer } from "./support/manifest-server.js";

const RUNS = Number(process.env.FUZZ_RUNS ?? 40);
const SEED = process.env.FUZZ_SEED === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(process.env.FUZZ_SEED);

/** What the stub does: `cchc_` + 32 random bytes base64url, and the sha256 of exactly that text. */
function chooseCredential(): { credential: string; sha256: string } {
  const credential = `cchc_${randomBytes(32).toString("base64url")}`;
  return { credential, sha256: createHash("sha256").update(credential).digest("hex") };
}

let srv: ManifestServer;
beforeAll(async () => {
  srv = await startManifestServer();
  serveGoodManifests(srv);
});
afterAll(async () => srv?.close());

describeOnDatabases("idempotent exchange", (h) => {
  let hub: RunningHub;
  const logged: string[] = [];
  beforeAll(async () => {
    hub = await startHub({
      db: h.db,
      artifactBaseUrl: srv.baseUrl,
      settings: { secret_names: [] },
      streamRecheckMs: 60_000,
      logError: (m, e) => logged.push(`${m} ${String(e)}`),
    });
  });
  afterAll(async () => {
    await hub?.close();
    expect(logged).toEqual([]);
  });

  const url = (hostId: string, path: string) => `${hub.bootstrapUrl}/hosts/${hostId}${path}`;
  const exchange = (hostId: string, bearer: string, body?: string | Uint8Array) =>
    fetch(url(hostId, "/credential"), {
      method: "POST",
      headers: { authorization: `Bearer ${bearer}`, ...(body === undefined ? {} : { "content-type": "application/json" }) },
      ...(body === undefined ? {} : { body }),
    });
  const chosenBody = (sha256: string) => JSON.stringify({ credential_sha256: sha256 });
  const record = async (hostId: string) => (await (await fetch(url(hostId, "/credentials"))).json()) as HostCredentialRecord;
  const provisioned = async () => hub.provisionHost(hostRecord(), {});

  it("the host-chosen credential: 201 once, then 200 for every retry (logged as retry, not replay); the credential opens the host's routes", async () => {
    const { hostId, token } = await provisioned();
    const mine = chooseCredential();
    const first = await exchange(hostId, token, chosenBody(mine.sha256));
    expect(first.status).toBe(201);
    expect(first.headers.get("cache-control")).toBe("no-store");
    const body = (await first.json()) as Record<string, unknown>;
    expect(body).toMatchObject({ credential: null, credential_sha256: mine.sha256, exchange: "new" });
    for (let i = 0; i < 3; i++) {
      const again = await exchange(hostId, token, chosenBody(mine.sha256));
      expect(again.status).toBe(200);
      expect(await again.json()).toEqual({ ...body, exchange: "retry" });
    }
    expect((await fetch(url(hostId, "/config"), { headers: { authorization: `Bearer ${mine.credential}` } })).status).toBe(200);
    const r = await record(hostId);
    expect(r.replays).toBe(0);
    // retries from one address are coalesced to one entry a minute, like replays
    expect(r.log.map((e) => e.kind)).toEqual(["retry", "exchange"]);
    expect(r.log[1]!.detail).toBe("bootstrap token exchanged for the host-chosen credential");
    expect(r.credentials).toHaveLength(1);
    expect(JSON.stringify(r)).not.toContain(mine.sha256);
  });

  it("the token with another credential (an attacker's copy, after the host): 401 token_already_exchanged, a replay in the log, the host's credential untouched", async () => {
    const { hostId, token } = await provisioned();
    const mine = chooseCredential();
    expect((await exchange(hostId, token, chosenBody(mine.sha256))).status).toBe(201);
    for (const body of [chosenBody(chooseCredential().sha256), undefined]) {
      const replay = await exchange(hostId, token, body);
      expect(replay.status).toBe(401);
      expect(((await replay.json()) as { code: string }).code).toBe("token_already_exchanged");
    }
    const r = await record(hostId);
    expect(r.replays).toBe(1); // two attempts from one address within a minute: one entry
    expect(r.credentials).toHaveLength(1);
    expect(r.credentials[0]!.revoked_at).toBeNull();
    expect((await fetch(url(hostId, "/config"), { headers: { authorization: `Bearer ${mine.credential}` } })).status).toBe(200);
  });

  it("an attacker racing the host: exactly one of many concurrent exchanges wins; the host's own concurrent retries all succeed", async () => {
    const { hostId, token } = await provisioned();
    const mine = chooseCredential();
    const theirs = chooseCredential();
    const bodies = [mine, theirs, mine, theirs, mine, mine];
    const answers = await Promise.all(bodies.map((c) => exchange(hostId, token, chosenBody(c.sha256))));
    const statuses = answers.map((a) => a.status);
    expect(statuses.filter((s) => s === 201)).toHaveLength(1);
    const winner = bodies[statuses.indexOf(201)]!;
    bodies.forEach((c, i) => {
      expect(statuses[i], `answer ${i}`).toBe(c === winner ? (i === statuses.indexOf(201) ? 201 : 200) : 401);
    });
    const r = await record(hostId);
    expect(r.credentials).toHaveLength(1);
    // the losers are visible (concurrent ones may each be written: the one-a-minute coalescing is not a lock)
    expect(r.replays).toBeGreaterThanOrEqual(1);
    expect(r.log.filter((e) => e.kind === "exchange")).toHaveLength(1);
  });

  it("a stub of the previous version (no body): a hub-made credential, once, as before; a retry of it is a replay", async () => {
    const { hostId, token } = await provisioned();
    const res = await exchange(hostId, token);
    expect(res.status).toBe(201);
    const body = (await res.json()) as { credential: string; rotate_after: string; credential_sha256?: string };
    expect(body.credential).toMatch(CREDENTIAL_RE);
    expect(body.credential_sha256).toBeUndefined();
    const sha = createHash("sha256").update(body.credential).digest("hex");
    expect((await exchange(hostId, token, chosenBody(sha))).status).toBe(401);
    expect((await exchange(hostId, token)).status).toBe(401);
    expect((await record(hostId)).log.map((e) => e.kind)).toEqual(["replay", "exchange"]);
  });

  it("a sha256 that is a credential already (another host's, this host's older one): 409 credential_in_use, the token stays unspent", async () => {
    const a = await provisioned();
    const b = await provisioned();
    const mine = chooseCredential();
    expect((await exchange(a.hostId, a.token, chosenBody(mine.sha256))).status).toBe(201);
    const reuse = await exchange(b.hostId, b.token, chosenBody(mine.sha256));
    expect(reuse.status).toBe(409);
    expect(((await reuse.json()) as { code: string }).code).toBe("credential_in_use");
    expect(await tokenExchanged(h.db, b.token)).toBe(false);
    expect((await exchange(b.hostId, b.token, chosenBody(chooseCredential().sha256))).status).toBe(201);
    // and host a's credential was not touched
    expect((await fetch(url(a.hostId, "/config"), { headers: { authorization: `Bearer ${mine.credential}` } })).status).toBe(200);
  });

  it("rotation takes no body: a credential_sha256 with a credential is a 400, and nothing rotates", async () => {
    const { hostId, token } = await provisioned();
    const mine = chooseCredential();
    await exchange(hostId, token, chosenBody(mine.sha256));
    const res = await exchange(hostId, mine.credential, chosenBody(chooseCredential().sha256));
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: string }).error).toMatch(/credential_sha256: only with a bootstrap token/);
    expect((await record(hostId)).credentials).toHaveLength(1);
  });

  it("store: a retry after the token expired is still acknowledged; after revocation or re-provisioning it is refused", async () => {
    const { hostId, token } = await provisioned();
    const mine = chooseCredential();
    const t0 = new Date();
    expect((await exchangeOrRotate(h.db, hostId, token, { now: t0, chosenSha256: mine.sha256 })).ok).toBe(true);
    const later = new Date(t0.getTime() + 3 * 24 * 3600_000);
    const retry = await exchangeOrRotate(h.db, hostId, token, { now: later, chosenSha256: mine.sha256 });
    expect(retry.ok && retry.grant.chosen).toEqual({ sha256: mine.sha256, outcome: "retry" });
    // re-provisioned: a new token is issued (the old one revoked)
    await issueToken(h.db, hostId, { now: later });
    const afterReissue = await exchangeOrRotate(h.db, hostId, token, { now: later, chosenSha256: mine.sha256 });
    expect(afterReissue.ok || afterReissue.code).toBe("token_revoked");
    const other = await provisioned();
    const theirs = chooseCredential();
    await exchangeOrRotate(h.db, other.hostId, other.token, { chosenSha256: theirs.sha256 });
    await revokeHostCredentials(h.db, other.hostId, { why: "host deleted" });
    const afterRevoke = await exchangeOrRotate(h.db, other.hostId, other.token, { chosenSha256: theirs.sha256 });
    expect(afterRevoke.ok || afterRevoke.code).toBe("token_revoked");
    expect((await record(other.hostId)).log.some((e) => e.kind === "refused" && e.detail === "exchange retry refused: token_revoked")).toBe(true);
  });

  it("fast-check: a hostile body is a 400 naming the field (or the body), before the token is looked at; nothing changes", async () => {
    const { hostId, token } = await provisioned();
    const hexChar = fc.constantFrom(..."0123456789abcdef");
    const hex = (min: number, max: number) => fc.array(hexChar, { minLength: min, maxLength: max }).map((xs) => xs.join(""));
    const notSha = fc.oneof(
      hex(0, 63),
      hex(65, 200),
      hex(64, 64)
        .map((s) => s.toUpperCase())
        .filter((s) => /[A-F]/.test(s)),
      fc
        .tuple(
          hex(63, 63),
          fc.string({ minLength: 1, maxLength: 1 }).filter((c) => !/[0-9a-f]/.test(c)),
        )
        .map(([a, c]) => a + c),
      fc.string({ maxLength: 80 }).filter((s) => !/^[0-9a-f]{64}$/.test(s)),
    );
    type Case = { body: string | Uint8Array; field: RegExp };
    const fieldCase = (v: unknown): Case => ({ body: JSON.stringify({ credential_sha256: v }), field: /credential_sha256: must be/ });
    const hostile: fc.Arbitrary<Case> = fc.oneof(
      notSha.map(fieldCase),
      fc.oneof(fc.integer(), fc.boolean(), fc.constant(null), fc.array(hex(64, 64), { maxLength: 2 }), fc.dictionary(fc.string(), fc.string())).map(fieldCase),
      fc
        .tuple(
          hex(64, 64),
          fc.string({ minLength: 1, maxLength: 10 }).filter((k) => k !== "credential_sha256" && k !== "__proto__"),
        )
        .map(([s, k]): Case => ({ body: JSON.stringify({ credential_sha256: s, [k]: 1 }), field: /invalid credential request: Unrecognized key/ })),
      fc
        .oneof(fc.integer(), fc.string(), fc.array(fc.integer(), { maxLength: 3 }), fc.constant(null))
        .map((v): Case => ({ body: JSON.stringify(v), field: /invalid credential request: must be a JSON object/ })),
      fc
        .string({ minLength: 1, maxLength: 40 })
        .filter((s) => {
          try {
            JSON.parse(s);
            return false;
          } catch {
            return true;
          }
        })
        .map((s): Case => ({ body: s, field: /the request body is not JSON/ })),
      fc
        .integer({ min: EXCHANGE_BODY_MAX_BYTES + 1, max: 4 * 1024 * 1024 })
        .map((n): Case => ({ body: new Uint8Array(n).fill(0x7b), field: /the request body is too large/ })),
    );
    const property = fc.asyncProperty(hostile, async ({ body, field }) => {
      const res = await exchange(hostId, token, body);
      const answer = (await res.json()) as { error: string };
      expect(res.status, JSON.stringify(answer)).toBe(400);
      expect(answer.error).toMatch(/^invalid credential request: /);
      expect(answer.error).toMatch(field);
    });
    try {
      await fc.assert(property, { numRuns: RUNS, seed: SEED, endOnFailure: true });
    } catch (err) {
      console.error(`fuzz: exchange bodies failed; replay with FUZZ_SEED=${SEED} FUZZ_RUNS=${RUNS}`);
      throw err;
    }
    expect(await tokenExchanged(h.db, token)).toBe(false);
    expect((await record(hostId)).log).toEqual([]);
    expect((await exchange(hostId, token, chosenBody(chooseCredential().sha256))).status).toBe(201);
  });
});
