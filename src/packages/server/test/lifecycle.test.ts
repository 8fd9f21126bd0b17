/**
 * The hub's lifecycle call points: stop, delete and deprovision revoke every
 * credential of the host (its config, secrets and events routes answer 401
 * afterwards), delete and deprovision drop its stored secrets, other hosts are
 * untouched, and the revocation is one pluggable function (the creds work's
 * `revokeHostCredentials`) run in the same transaction.
 */
import { randomUUID } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Db, openPglite, type Queryable } from "../cloud/bootstrap/db.js";
import { type RunningHub, startHub } from "../cloud/bootstrap/hub.js";
import { onHostDeleted, onHostDeprovisioned, onHostStopped, type RevokeHostCredentials } from "../cloud/bootstrap/lifecycle.js";
import { getSecret, listHostTokens, revokeHostTokens } from "../cloud/bootstrap/store.js";
import { hostRecord } from "./support/fixtures.js";
import { type ManifestServer, serveGoodManifests, startManifestServer } from "./support/manifest-server.js";

let srv: ManifestServer;
let db: Db;
let hub: RunningHub;

beforeAll(async () => {
  srv = await startManifestServer();
  serveGoodManifests(srv);
  db = await openPglite();
  hub = await startHub({ db, artifactBaseUrl: srv.baseUrl, settings: { secret_names: ["conat-password"] }, enableAdmin: true });
});

afterAll(async () => {
  await hub?.close();
  await db?.close();
  await srv?.close();
});

async function provisioned() {
  const host = await hub.provisionHost(hostRecord(), { secrets: { "conat-password": "pw-0123456789" } });
  return { ...host, config: () => fetch(`${host.baseUrl}/config`, { headers: { authorization: `Bearer ${host.token}` } }) };
}

describe("host lifecycle call points", () => {
  it("stop revokes the host's credentials (config answers 401) and keeps its secrets; a second stop revokes nothing", async () => {
    const h = await provisioned();
    const bystander = await provisioned();
    expect((await h.config()).status).toBe(200);
    expect(await onHostStopped({ db }, h.hostId)).toEqual({ hostId: h.hostId, event: "stop", revoked: 1, secretsDeleted: 0 });
    expect((await h.config()).status).toBe(401);
    expect(await getSecret(db, h.hostId, "conat-password")).toBe("pw-0123456789");
    expect((await listHostTokens(db, h.hostId)).every((t) => t.revokedAt !== null)).toBe(true);
    expect((await onHostStopped({ db }, h.hostId)).revoked).toBe(0);
    expect((await bystander.config()).status).toBe(200);
  });

  it("stop revokes an exchanged host credential too (config with it answers 401, the revocation is in the credential log)", async () => {
    const h = await provisioned();
    const exchanged = await fetch(`${h.baseUrl}/credential`, { method: "POST", headers: { authorization: `Bearer ${h.token}` } });
    expect(exchanged.status).toBe(201);
    const { credential } = (await exchanged.json()) as { credential: string };
    const withCredential = () => fetch(`${h.baseUrl}/config`, { headers: { authorization: `Bearer ${credential}` } });
    expect((await withCredential()).status).toBe(200);
    expect((await onHostStopped({ db }, h.hostId)).revoked).toBe(2);
    expect((await withCredential()).status).toBe(401);
    const record = (await (await fetch(`${h.baseUrl}/credentials`)).json()) as { log: { kind: string; detail: string }[] };
    expect(record.log.some((e) => e.kind === "revoke" && e.detail.includes("host lifecycle"))).toBe(true);
  });

  it("delete and deprovision revoke the credentials and drop the stored secrets", async () => {
    for (const call of [onHostDeleted, onHostDeprovisioned]) {
      const h = await provisioned();
      const done = await call({ db }, h.hostId);
      expect(done).toMatchObject({ hostId: h.hostId, revoked: 1, secretsDeleted: 1 });
      expect((await h.config()).status).toBe(401);
      expect(await getSecret(db, h.hostId, "conat-password")).toBeNull();
    }
  });

  it("the revocation is one function (the creds work plugs in here), in one transaction with the rest", async () => {
    const h = await provisioned();
    const seen: string[] = [];
    const revoke: RevokeHostCredentials = async (_tx: Queryable, hostId) => {
      seen.push(hostId);
      return 7;
    };
    expect((await onHostDeprovisioned({ db, revoke }, h.hostId)).revoked).toBe(7);
    expect(seen).toEqual([h.hostId]);
    // one transaction: a revocation that fails half-way (tokens revoked, then an error) changes nothing
    const g = await provisioned();
    const broken: RevokeHostCredentials = async (tx, hostId, now) => {
      await revokeHostTokens(tx, hostId, now);
      throw new Error("credential store down");
    };
    await expect(onHostDeleted({ db, revoke: broken }, g.hostId)).rejects.toThrow("credential store down");
    expect((await g.config()).status).toBe(200);
    expect(await getSecret(db, g.hostId, "conat-password")).toBe("pw-0123456789");
  });

  it("admin routes (loopback): stop, delete, deprovision; 404 for an unknown host or event, 400 for a bad id", async () => {
    const h = await provisioned();
    const post = (path: string) => fetch(`${hub.url}/admin/hosts/${path}`, { method: "POST" });
    const r = await post(`${h.hostId}/deprovision`);
    expect(r.status).toBe(200);
    expect(await r.json()).toEqual({ host_id: h.hostId, event: "deprovision", revoked: 1, secrets_deleted: 1 });
    expect((await h.config()).status).toBe(401);
    expect((await post(`${randomUUID()}/stop`)).status).toBe(404);
    expect((await post(`${h.hostId}/reboot`)).status).toBe(404);
    expect((await post("not-a-uuid/stop")).status).toBe(400);
  });
});
