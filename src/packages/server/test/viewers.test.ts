/**
 * Viewer access: a host's status, stream and page, and the fleet's, are
 * closed by default (loopback only), open to whom `authorizeViewer` /
 * `authorizeFleetViewer` allow, and refused cleanly (403) when one throws.
 * A non-loopback caller is real: the hub listens on every address and the
 * test connects through this machine's own non-loopback address. Then the
 * cost of a crowd of streaming viewers, counted.
 */
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { networkInterfaces } from "node:os";
import type { BootstrapEventInput } from "@cocalc/project-host-bootstrap";
import type { Request } from "express";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type CreateAppOptions, createApp, type HubApp } from "../cloud/bootstrap/app.js";
import { type Db, openPglite } from "../cloud/bootstrap/db.js";
import { migrate } from "../cloud/bootstrap/migrate.js";
import { foldCounters, type HostStatus } from "../cloud/bootstrap/status.js";
import { hostRecord, RunScript, siteSettings } from "./support/fixtures.js";
import { type ManifestServer, serveGoodManifests, startManifestServer } from "./support/manifest-server.js";
import { SseClient } from "./support/sse.js";

/** This machine's first non-loopback IPv4 address, or null. */
function outsideAddress(): string | null {
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) if (a.family === "IPv4" && !a.internal) return a.address;
  }
  return null;
}

interface Served {
  hub: HubApp;
  server: Server;
  port: number;
  /** `http://<address>:<port>/bootstrap` */
  at(address: string): string;
  close(): Promise<void>;
}

let srv: ManifestServer;
let db: Db;
const logged: string[] = [];

async function serve(opts: Partial<CreateAppOptions>): Promise<Served> {
  const hub = createApp({ db, settings: siteSettings(srv.baseUrl, { secret_names: [] }), logError: (m, e) => logged.push(`${m}: ${String(e)}`), ...opts });
  const server = createServer(hub.app);
  await new Promise<void>((resolve) => server.listen(0, "0.0.0.0", resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    hub,
    server,
    port,
    at: (address) => `http://${address}:${port}/bootstrap`,
    async close() {
      await hub.close();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

const outside = outsideAddress();
if (!outside) console.warn("viewer tests from a non-loopback address skipped: this machine has no non-loopback IPv4 address");

beforeAll(async () => {
  srv = await startManifestServer();
  serveGoodManifests(srv);
  db = await openPglite();
  await migrate(db);
});

afterAll(async () => {
  await db?.close();
  await srv?.close();
});

const viewerPaths = (id: string) => [`/hosts/${id}/status`, `/hosts/${id}/stream`, `/hosts/${id}/`];
const fleetPaths = ["/fleet/status", "/fleet/"];

/** GET; a stream is read only up to its headers. */
async function statusOf(url: string, headers: Record<string, string> = {}): Promise<{ status: number; body: string }> {
  const ac = new AbortController();
  const r = await fetch(url, { headers, signal: ac.signal, redirect: "manual" });
  if ((r.headers.get("content-type") ?? "").startsWith("text/event-stream")) {
    ac.abort();
    return { status: r.status, body: "" };
  }
  return { status: r.status, body: await r.text() };
}

describe("without an authorizer: loopback only", () => {
  let s: Served;
  let id: string;
  beforeAll(async () => {
    s = await serve({});
    id = (await s.hub.provisionHost(hostRecord(), { secrets: {} })).hostId;
  });
  afterAll(() => s?.close());

  it("loopback callers see a host and the fleet (the demo keeps working)", async () => {
    for (const p of [...viewerPaths(id), ...fleetPaths]) expect((await statusOf(`${s.at("127.0.0.1")}${p}`)).status, p).toBe(200);
  });

  it.skipIf(!outside)("other callers are refused with 403, whatever X-Forwarded-For says", async () => {
    for (const p of viewerPaths(id)) {
      const r = await statusOf(`${s.at(outside!)}${p}`, { "x-forwarded-for": "127.0.0.1" });
      expect(r.status, p).toBe(403);
      expect(JSON.parse(r.body)).toEqual({ error: "not allowed to view this host" });
    }
    for (const p of fleetPaths) {
      const r = await statusOf(`${s.at(outside!)}${p}`);
      expect(r.status, p).toBe(403);
      expect(JSON.parse(r.body)).toEqual({ error: "not allowed to view the fleet" });
    }
    // the host's own routes are not viewer routes: bootstrap.py is public, events need the token
    expect((await statusOf(`${s.at(outside!)}/bootstrap.py`)).status).toBe(200);
  });
});

describe.skipIf(!outside)("with authorizers", () => {
  let s: Served;
  let allowedId: string;
  let otherId: string;
  let behaviour: "decide" | "throw" | "reject" | "truthy" = "decide";
  const asked: string[] = [];
  beforeAll(async () => {
    s = await serve({
      authorizeViewer: (req: Request, hostId: string) => {
        asked.push(hostId);
        if (behaviour === "throw") throw new Error("session store unavailable");
        if (behaviour === "reject") return Promise.reject(new Error("session store timed out"));
        if (behaviour === "truthy") return "yes" as unknown as boolean;
        return Promise.resolve(hostId === allowedId && req.get("cookie") === "session=ok");
      },
      authorizeFleetViewer: (req: Request) => {
        if (behaviour === "throw") throw new Error("session store unavailable");
        return req.get("cookie") === "session=admin";
      },
    });
    allowedId = (await s.hub.provisionHost(hostRecord(), { secrets: {} })).hostId;
    otherId = (await s.hub.provisionHost(hostRecord(), { secrets: {} })).hostId;
  });
  afterAll(() => s?.close());

  it("lets in exactly whom it allows, from any address", async () => {
    behaviour = "decide";
    for (const p of viewerPaths(allowedId)) {
      expect((await statusOf(`${s.at(outside!)}${p}`, { cookie: "session=ok" })).status, p).toBe(200);
      expect((await statusOf(`${s.at(outside!)}${p}`)).status, p).toBe(403);
    }
    for (const p of viewerPaths(otherId)) expect((await statusOf(`${s.at(outside!)}${p}`, { cookie: "session=ok" })).status, p).toBe(403);
    // an authorizer replaces the loopback rule: loopback without a session is refused too
    expect((await statusOf(`${s.at("127.0.0.1")}/hosts/${allowedId}/status`)).status).toBe(403);
    expect(asked).toContain(otherId);
    for (const p of fleetPaths) {
      expect((await statusOf(`${s.at(outside!)}${p}`, { cookie: "session=admin" })).status, p).toBe(200);
      expect((await statusOf(`${s.at(outside!)}${p}`, { cookie: "session=ok" })).status, p).toBe(403);
    }
  });

  for (const b of ["throw", "reject", "truthy"] as const) {
    it(`an authorizer that ${b === "truthy" ? "answers something other than true" : `${b}s`} refuses with a clean 403, and the hub keeps serving`, async () => {
      behaviour = b;
      const before = logged.length;
      for (const p of viewerPaths(allowedId)) {
        const r = await statusOf(`${s.at(outside!)}${p}`, { cookie: "session=ok" });
        expect(r.status, p).toBe(403);
        expect(JSON.parse(r.body)).toEqual({ error: "not allowed to view this host" }); // nothing of the error shown
      }
      if (b !== "truthy") {
        expect(logged.slice(before).join("\n")).toContain("authorizeViewer threw; refused");
        expect(logged.slice(before).join("\n")).toContain("session store");
      }
      behaviour = "decide";
      expect((await statusOf(`${s.at(outside!)}/hosts/${allowedId}/status`, { cookie: "session=ok" })).status).toBe(200);
    });
  }

  it("a throwing fleet authorizer refuses with 403 too", async () => {
    behaviour = "throw";
    try {
      for (const p of fleetPaths) expect((await statusOf(`${s.at(outside!)}${p}`, { cookie: "session=admin" })).status, p).toBe(403);
    } finally {
      behaviour = "decide";
    }
  });
});

describe("the cost of streaming viewers", () => {
  it("50 viewers x 60 batches: one bounded fold per change, not one per viewer or per stored event; one write per viewer per change", async () => {
    const s = await serve({ streamRecheckMs: 600_000, heartbeatMs: 600_000 });
    const { hostId: id, token } = await s.hub.provisionHost(hostRecord(), { secrets: {} });
    const post = (events: BootstrapEventInput[]) =>
      fetch(`${s.at("127.0.0.1")}/hosts/${id}/events`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
        body: JSON.stringify({ host_id: id, events }),
      });
    const run = new RunScript().start();
    for (let i = 0; i < 100; i++) run.progress(`warm-up ${i}`, 0); // a run already long before the viewers come
    expect((await post(run.events)).status).toBe(200);
    const viewers = await Promise.all(Array.from({ length: 50 }, () => new SseClient().open(`${s.at("127.0.0.1")}/hosts/${id}/stream`)));
    const frames = new Map<SseClient, number>();
    try {
      for (const v of viewers) await v.next((e) => e.event === "status");
      const folds0 = foldCounters.folds;
      const folded0 = foldCounters.eventsFolded;
      const derivations0 = s.hub.streams.derivations;
      const writes0 = s.hub.streams.writes;
      const batches = 60;
      for (let b = 1; b <= batches; b++) {
        const from = run.events.length;
        run.progress(`batch ${b}`, b);
        run.progress(`batch ${b} (2)`, b + 0.5);
        expect((await post(run.events.slice(from))).status).toBe(200);
        // every viewer sees this change before the next batch: no coalescing hides the cost
        await Promise.all(
          viewers.map(async (v) => {
            await v.next((e) => e.event === "status" && (JSON.parse(e.data) as HostStatus).percent === b + 0.5);
            frames.set(v, (frames.get(v) ?? 0) + 1);
          }),
        );
      }
      const derivations = s.hub.streams.derivations - derivations0;
      const writes = s.hub.streams.writes - writes0;
      const folds = foldCounters.folds - folds0;
      const folded = foldCounters.eventsFolded - folded0;
      const stored = run.events.length;
      console.log(
        `streaming cost: ${viewers.length} viewers, ${batches} batches (${stored} events stored in all): ${folds} folds, ${folded} events folded (${(folded / folds).toFixed(1)} per fold), ${derivations} derivations, ${writes} frames written (${(writes / viewers.length).toFixed(1)} per viewer)`,
      );
      // one fold per change (a notification racing a fold may add one more), however many viewers
      expect(folds).toBeGreaterThanOrEqual(batches);
      expect(folds).toBeLessThanOrEqual(2 * batches);
      expect(derivations).toBe(folds); // this hub folds only for its streams here (no adapter)
      // each fold reads the run's digest (run_start, latest progress, ...), never the whole run
      expect(folded / folds).toBeLessThanOrEqual(5);
      expect(folded).toBeLessThan(stored);
      // and each viewer was written once per change: one write, nothing else
      for (const n of frames.values()) expect(n).toBe(batches);
      expect(writes).toBe(viewers.length * batches);
    } finally {
      for (const v of viewers) v.close();
      await s.close();
    }
  });
});
