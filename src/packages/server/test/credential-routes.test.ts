/**
 * The credential routes over HTTP, on PGlite and a real PostgreSQL: the
 * exchange, its refusal on replay (401 with a code, visible in the host's
 * credential record), every host route taking the credential and refusing
 * the spent token, rotation, revocation, and a fast-check property over
 * arbitrary Authorization headers (never a 500, never a grant).
 */
import { bootstrapPySha256 } from "@cocalc/project-host-bootstrap";
import fc from "fast-check";
import { afterAll, beforeAll, expect, it } from "vitest";
import { CREDENTIAL_RE, type HostCredentialRecord, revokeHostCredentials } from "../cloud/bootstrap/credentials.js";
import { type RunningHub, startHub } from "../cloud/bootstrap/hub.js";
import { bearerToken } from "../cloud/bootstrap/tokens.js";
import { describeOnDatabases } from "./support/databases.js";
import { hostRecord } from "./support/fixtures.js";
import { type ManifestServer, serveGoodManifests, startManifestServer } from "./support/manifest-server.js";

const RUNS = Number(process.env.FUZZ_RUNS ?? 40);
const SEED = process.env.FUZZ_SEED === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(process.env.FUZZ_SEED);
const SECRET = "conat-secret-for-credential-routes";

let srv: ManifestServer;
beforeAll(async () => {
  srv = await startManifestServer();
  serveGoodManifests(srv);
});
afterAll(async () => srv?.close());

describeOnDatabases("credential routes", (h) => {
  let hub: RunningHub;
  const logged: string[] = [];
  beforeAll(async () => {
    hub = await startHub({
      db: h.db,
      artifactBaseUrl: srv.baseUrl,
      settings: { secret_names: ["conat-password"] },
      streamRecheckMs: 60_000,
      credentialPolicy: { rotateAfterMs: 0, graceMs: 60_000 },
      logError: (m, e) => logged.push(`${m} ${String(e)}`),
    });
  });
  afterAll(async () => {
    await hub?.close();
    expect(logged).toEqual([]);
  });

  const url = (hostId: string, path: string) => `${hub.bootstrapUrl}/hosts/${hostId}${path}`;
  const bearer = (t: string) => ({ authorization: `Bearer ${t}` });
  const exchange = (hostId: string, t: string | null) => fetch(url(hostId, "/credential"), { method: "POST", headers: t ? bearer(t) : {} });

  async function provisioned() {
    const p = await hub.provisionHost(hostRecord(), { secrets: { "conat-password": SECRET } });
    return { hostId: p.hostId, token: p.token };
  }

  it("POST credential: 201 {credential, rotate_after} once; the replay is 401 token_already_exchanged and visible", async () => {
    const { hostId, token } = await provisioned();
    const res = await exchange(hostId, token);
    expect(res.status).toBe(201);
    expect(res.headers.get("cache-control")).toBe("no-store");
    const body = (await res.json()) as { credential: string; rotate_after: string };
    expect(body.credential).toMatch(CREDENTIAL_RE);
    expect(new Date(body.rotate_after).toISOString()).toBe(body.rotate_after);
    const replay = await exchange(hostId, token);
    expect(replay.status).toBe(401);
    expect(replay.headers.get("www-authenticate")).toMatch(/^Bearer/);
    expect(await replay.json()).toEqual({
      error: "bootstrap token already exchanged for a host credential; it is single use",
      code: "token_already_exchanged",
    });
    const record = (await (await fetch(url(hostId, "/credentials"))).json()) as HostCredentialRecord;
    expect(record.replays).toBe(1);
    expect(record.log.map((e) => e.kind)).toEqual(["replay", "exchange"]);
    expect(record.log[0]!.address).toMatch(/127\.0\.0\.1/);
    expect(JSON.stringify(record)).not.toContain(body.credential);
  });

  it("config, secrets, events and bootstrap.py.sha256 take the credential and refuse the spent token", async () => {
    const { hostId, token } = await provisioned();
    // before the exchange the token still opens the routes (first contact, older stubs)
    expect((await fetch(url(hostId, "/config"), { headers: bearer(token) })).status).toBe(200);
    const { credential } = (await (await exchange(hostId, token)).json()) as { credential: string };
    const sha = await fetch(url(hostId, "/bootstrap.py.sha256"), { headers: bearer(credential) });
    expect(sha.status).toBe(200);
    expect((await sha.text()).trim()).toBe(bootstrapPySha256());
    expect((await fetch(url(hostId, "/config"), { headers: bearer(credential) })).status).toBe(200);
    const secret = await fetch(url(hostId, "/secrets/conat-password"), { headers: bearer(credential) });
    expect(await secret.text()).toBe(SECRET);
    const events = await fetch(url(hostId, "/events"), {
      method: "POST",
      headers: { ...bearer(credential), "content-type": "application/json" },
      body: JSON.stringify({ host_id: hostId, events: [] }),
    });
    expect([200, 422]).toContain(events.status); // authorized: an empty batch is judged on its content, not refused with 401
    for (const path of ["/config", "/secrets/conat-password", "/bootstrap.py.sha256"]) {
      const r = await fetch(url(hostId, path), { headers: bearer(token) });
      expect(r.status, path).toBe(401);
      expect(((await r.json()) as { code: string }).code).toBe("token_already_exchanged");
    }
    const spent = await fetch(url(hostId, "/events"), { method: "POST", headers: { ...bearer(token), "content-type": "application/json" }, body: "{}" });
    expect(spent.status).toBe(401);
    expect((await fetch(url(hostId, "/bootstrap.py.sha256"))).status).toBe(401);
  });

  it("rotation through the route (this hub rotates at once): a new credential; the old one works until the new one is used", async () => {
    const { hostId, token } = await provisioned();
    const first = ((await (await exchange(hostId, token)).json()) as { credential: string }).credential;
    const res = await exchange(hostId, first);
    expect(res.status).toBe(201);
    const second = ((await res.json()) as { credential: string }).credential;
    expect(second).not.toBe(first);
    expect((await fetch(url(hostId, "/config"), { headers: bearer(first) })).status).toBe(200);
    expect((await fetch(url(hostId, "/config"), { headers: bearer(second) })).status).toBe(200);
    const old = await fetch(url(hostId, "/config"), { headers: bearer(first) });
    expect(old.status).toBe(401);
    expect(((await old.json()) as { code: string }).code).toBe("credential_revoked");
  });

  it("revokeHostCredentials (the hub's stop/delete/deprovision): the credential is refused everywhere", async () => {
    const { hostId, token } = await provisioned();
    const { credential } = (await (await exchange(hostId, token)).json()) as { credential: string };
    expect(await revokeHostCredentials(h.db, hostId, { why: "host deleted" })).toEqual({ credentials: 1, tokens: 1 });
    for (const path of ["/config", "/bootstrap.py.sha256"]) {
      const r = await fetch(url(hostId, path), { headers: bearer(credential) });
      expect(r.status).toBe(401);
      expect(await r.json()).toEqual({ error: "host credential revoked (host deleted)", code: "credential_revoked" });
    }
    expect((await exchange(hostId, credential)).status).toBe(401);
  });

  it("another host's credential: 403 foreign_host", async () => {
    const a = await provisioned();
    const b = await provisioned();
    const { credential } = (await (await exchange(a.hostId, a.token)).json()) as { credential: string };
    const r = await fetch(url(b.hostId, "/config"), { headers: bearer(credential) });
    expect(r.status).toBe(403);
    expect(((await r.json()) as { code: string }).code).toBe("foreign_host");
    expect((await exchange(b.hostId, credential)).status).toBe(403);
  });

  it("fast-check: any Authorization header gets 401/403 with a JSON code (never 500, never a grant)", async () => {
    const { hostId, token } = await provisioned();
    const { credential } = (await (await exchange(hostId, token)).json()) as { credential: string };
    const headerChar = fc.oneof(
      fc.constantFrom(" ", "\t", "=", "_", "-", ".", "+", "/", "~", ":", ",", ";", '"', "\u00e9"),
      fc.string({ unit: "grapheme-ascii", minLength: 0, maxLength: 3 }),
    );
    const near = (s: string) =>
      fc.tuple(fc.nat({ max: s.length }), fc.string({ maxLength: 3 })).map(([i, ins]) => (s.slice(0, i) + ins + s.slice(i + 1)).replace(/[\r\n\0]/g, ""));
    const header = fc.oneof(
      fc.array(headerChar, { maxLength: 80 }).map((xs) => xs.join("")),
      fc.constantFrom("Bearer", "Bearer ", "bearer  x", "Basic Zm9vOmJhcg==", `Bearer ${token}`, `Bearer  ${credential}x`, `Bearer cchc_${"A".repeat(43)}`),
      near(`Bearer ${credential}`).filter((s) => bearerToken(s) !== credential),
      near(`Bearer ${token}`),
      fc.string({ maxLength: 60 }).map((s) => `Bearer ${s}`),
    );
    const property = fc.asyncProperty(header, fc.constantFrom("/config", "/bootstrap.py.sha256", "/credential"), async (value, path) => {
      let res: Response;
      try {
        res = await fetch(url(hostId, path), { method: path === "/credential" ? "POST" : "GET", headers: { authorization: value } });
      } catch {
        return; // a header undici will not send (e.g. a control character) never reaches the hub
      }
      const body = (await res.json()) as { error?: string; code?: string };
      expect([401, 403], `${JSON.stringify(value)} ${path} -> ${res.status} ${JSON.stringify(body)}`).toContain(res.status);
      expect(typeof body.code).toBe("string");
      expect(JSON.stringify(body)).not.toContain(credential);
    });
    try {
      await fc.assert(property, { numRuns: RUNS, seed: SEED, endOnFailure: true });
    } catch (err) {
      console.error(`fuzz: credential headers failed; replay with FUZZ_SEED=${SEED} FUZZ_RUNS=${RUNS}`);
      throw err;
    }
    // the real credential still works after all that
    expect((await fetch(url(hostId, "/config"), { headers: bearer(credential) })).status).toBe(200);
  });
});
