/**
 * The hub's host records (host-records.ts): the adapter is called with
 * upstream's `metadata.bootstrap` shape, against a real table that plays
 * upstream's hosts table (PGlite and PostgreSQL), through the real routes.
 */
import type { BootstrapEventInput } from "@cocalc/project-host-bootstrap";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  type BootstrapMetadata,
  type BootstrapStatusAdapter,
  bootstrapMetadata,
  getHostRecordState,
  jsonbMetadataAdapter,
  PENDING_MESSAGE,
} from "../cloud/bootstrap/host-records.js";
import { type RunningHub, startHub } from "../cloud/bootstrap/hub.js";
import { deriveStatus } from "../cloud/bootstrap/status.js";
import { getHost, getSecret, insertEvents, listHostTokens } from "../cloud/bootstrap/store.js";
import { describeOnDatabases } from "./support/databases.js";
import { hostRecord, RunScript } from "./support/fixtures.js";
import { type ManifestServer, serveGoodManifests, startManifestServer } from "./support/manifest-server.js";

/** bootstrap.py's plan, shortened: `service` is the step whose success means the daemon is healthy. */
const PLAN = [
  { name: "preflight", deps: [], weight: 1 },
  { name: "apt", deps: ["preflight"], weight: 30 },
  { name: "service", deps: ["apt"], weight: 10 },
  { name: "finalize", deps: ["service"], weight: 1 },
];

type Mode = "ok" | "throw" | "hang";

describeOnDatabases("host records: upstream's metadata.bootstrap", (h) => {
  let srv: ManifestServer;
  let hub: RunningHub;
  let mode: Mode = "ok";
  const calls: { hostId: string; status: BootstrapMetadata }[] = [];
  const logged: string[] = [];
  const table = jsonbMetadataAdapter({ table: "project_hosts" });
  const adapter: BootstrapStatusAdapter = {
    async onBootstrapStatus(hostId, status, ctx) {
      if (mode === "throw") throw new Error("the hosts table is down");
      if (mode === "hang") await new Promise(() => undefined);
      await table.onBootstrapStatus(hostId, status, ctx);
      calls.push({ hostId, status });
    },
  };

  beforeAll(async () => {
    srv = await startManifestServer();
    serveGoodManifests(srv);
    // Upstream's hosts table, as far as the bootstrap is concerned.
    await h.db.exec(`CREATE TABLE project_hosts (
      id uuid PRIMARY KEY, name text NOT NULL, status text NOT NULL DEFAULT 'starting', metadata jsonb NOT NULL DEFAULT '{}'::jsonb)`);
    hub = await startHub({
      db: h.db,
      artifactBaseUrl: srv.baseUrl,
      statusAdapter: adapter,
      hostRecordsSweepMs: 0, // the tests call sweep()
      hostRecordsTimeoutMs: 300,
      hostRecordsRetryBaseMs: 50,
      streamRecheckMs: 60_000,
      logError: (m, e) => logged.push(`${m}: ${String(e)}`),
    });
  });

  afterAll(async () => {
    mode = "ok";
    await hub?.close();
    await srv?.close();
  });

  async function newHost(): Promise<{ id: string; token: string }> {
    const record = hostRecord();
    await h.db.query("INSERT INTO project_hosts (id, name, metadata) VALUES ($1, $2, $3::jsonb)", [record.id, record.name, '{"machine":{"cloud":"gcp"}}']);
    const p = await hub.provisionHost(record, { secrets: {} });
    return { id: p.hostId, token: p.token };
  }

  async function post(id: string, token: string, events: BootstrapEventInput[]): Promise<Response> {
    return fetch(`${hub.bootstrapUrl}/hosts/${id}/events`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
      body: JSON.stringify({ host_id: id, events }),
    });
  }

  async function metadata(id: string): Promise<{ status: string; metadata: { bootstrap?: BootstrapMetadata; machine?: unknown } }> {
    const rows = await h.db.query<{ status: string; metadata: { bootstrap?: BootstrapMetadata } }>("SELECT status, metadata FROM project_hosts WHERE id = $1", [
      id,
    ]);
    return rows[0]!;
  }

  /** Send only what is new in `run` since the last call. */
  function sender(id: string, token: string, run: RunScript) {
    let sent = 0;
    return async () => {
      const r = await post(id, token, run.events.slice(sent));
      sent = run.events.length;
      expect(r.status).toBe(200);
      await hub.hostRecords!.flush();
    };
  }

  it("provisioning writes pending, with the token and secrets, in one transaction", async () => {
    const { id } = await newHost();
    const m = await metadata(id);
    expect(m.metadata.bootstrap).toMatchObject({ status: "pending", message: PENDING_MESSAGE, source: "cloud-init", percent: 0 });
    expect(Date.parse(m.metadata.bootstrap!.pending_at!)).toBeGreaterThan(Date.now() - 60_000);
    expect(m.metadata.machine).toEqual({ cloud: "gcp" }); // the rest of metadata is the hub's, untouched
    expect((await getHostRecordState(h.db, id))?.status?.status).toBe("pending");
  });

  it("provisioning is all or nothing: an adapter that refuses leaves no host, token or secret", async () => {
    const record = hostRecord(); // no project_hosts row: the adapter throws
    await expect(hub.provisionHost(record, { secrets: { "conat-password": "s3cret-value" } })).rejects.toThrow(/no row in project_hosts/);
    expect(await getHost(h.db, record.id)).toBeNull();
    expect(await listHostTokens(h.db, record.id)).toEqual([]);
    expect(await getSecret(h.db, record.id, "conat-password")).toBeNull();
    expect(await getHostRecordState(h.db, record.id)).toBeNull();
  });

  it("running with phase and percent, and done only once the service step is healthy and the run ended ok", async () => {
    const { id, token } = await newHost();
    const run = new RunScript();
    const send = sender(id, token, run);
    run.start(PLAN).stepStart("preflight").progress("checking the machine", 3);
    await send();
    expect((await metadata(id)).metadata.bootstrap).toMatchObject({ status: "running", phase: "checking the machine", percent: 3, run_id: run.runId });
    run.stepEnd("preflight", "changed").stepStart("apt").stepEnd("apt", "changed", 30).stepStart("service").stepEnd("service", "changed", 8);
    await send();
    expect((await metadata(id)).metadata.bootstrap?.status).toBe("running"); // healthy daemon, but the run has not ended
    run.stepStart("finalize").stepEnd("finalize", "changed").end(true);
    await send();
    const m = await metadata(id);
    expect(m.metadata.bootstrap).toMatchObject({ status: "done", message: "the daemon is up and healthy", percent: 100, failed_step: null });
    expect(Date.parse(m.metadata.bootstrap!.updated_at)).toBeGreaterThan(Date.now() - 60_000);
    expect(m.metadata.bootstrap!.source).toBe("cloud-init"); // merged as upstream merges: pending's other keys stay
    // upstream's reconcile: a starting host becomes running only on done
    await h.db.query("UPDATE project_hosts SET status = 'running' WHERE status = 'starting' AND metadata->'bootstrap'->>'status' = 'done'");
    expect((await metadata(id)).status).toBe("running");
    const seen = calls.filter((c) => c.hostId === id).map((c) => c.status.status);
    expect(seen[0]).toBe("pending");
    expect(seen.at(-1)).toBe("done");
    expect(seen.indexOf("done")).toBe(seen.length - 1);
  });

  it("a run that ended ok without the service step is an error that says so, never done", async () => {
    const { id, token } = await newHost();
    const run = new RunScript().start(PLAN.slice(0, 2)).stepStart("apt").stepEnd("apt", "unchanged").end(true);
    await sender(id, token, run)();
    const b = (await metadata(id)).metadata.bootstrap!;
    expect(b.status).toBe("error");
    expect(b.message).toMatch(/without the service step.*health is unknown/);
  });

  it("a failed run is an error naming the failed step and why", async () => {
    const { id, token } = await newHost();
    const run = new RunScript()
      .start(PLAN)
      .stepStart("service")
      .stepEnd("service", "failed", 60, { message: "http://127.0.0.1:9002/healthz answers 503", hint: "See the daemon's log." })
      .end(false, { failed_step: "service" });
    await sender(id, token, run)();
    expect((await metadata(id)).metadata.bootstrap).toMatchObject({
      status: "error",
      failed_step: "service",
      message: "bootstrap failed at service: http://127.0.0.1:9002/healthz answers 503 See the daemon's log.",
    });
  });

  it("a failing adapter: the batch is stored and acknowledged, the status is retried until it is delivered", async () => {
    const { id, token } = await newHost();
    const run = new RunScript().start(PLAN).stepStart("service").stepEnd("service", "unchanged").end(true);
    mode = "throw";
    try {
      await sender(id, token, run)(); // 200: the host never resends because the hub's records are down
      const status = (await (await fetch(`${hub.bootstrapUrl}/hosts/${id}/status`)).json()) as { state: string; events: number };
      expect(status).toMatchObject({ state: "done", events: run.events.length }); // stored, not lost
      expect((await metadata(id)).metadata.bootstrap?.status).toBe("pending"); // not delivered yet
      const failed = await getHostRecordState(h.db, id);
      expect(failed?.attempts).toBe(1);
      expect(failed?.lastError).toContain("the hosts table is down");
      expect(failed?.nextAttemptAt).not.toBeNull();
      expect(logged.join("\n")).toContain(`onBootstrapStatus(${id}, done) failed (attempt 1`);
      await new Promise((r) => setTimeout(r, 80)); // the first retry is due after 50 ms
      expect(await hub.hostRecords!.sweep()).toBeGreaterThanOrEqual(1); // still refused: attempt 2, backoff doubles
      expect((await getHostRecordState(h.db, id))?.attempts).toBe(2);
    } finally {
      mode = "ok";
    }
    await new Promise((r) => setTimeout(r, 150));
    await hub.hostRecords!.sweep();
    expect((await metadata(id)).metadata.bootstrap?.status).toBe("done");
    const healed = await getHostRecordState(h.db, id);
    expect(healed).toMatchObject({ attempts: 0, lastError: null, nextAttemptAt: null });
    const made = hub.hostRecords!.calls;
    await hub.hostRecords!.sweep(); // (recent hosts are looked at again, in case a commit raced the derivation)
    expect(hub.hostRecords!.calls).toBe(made); // but nothing is left to deliver
  });

  it("a refused delivery is retried at once by the host's next batch", async () => {
    const { id, token } = await newHost();
    const run = new RunScript().start(PLAN).stepStart("preflight");
    const send = sender(id, token, run);
    mode = "throw";
    try {
      await send();
    } finally {
      mode = "ok";
    }
    expect((await metadata(id)).metadata.bootstrap?.status).toBe("pending");
    run.progress("installing packages", 20);
    await send();
    expect((await metadata(id)).metadata.bootstrap).toMatchObject({ status: "running", percent: 20 });
  });

  it("an adapter that hangs times out, is recorded as failed, and does not hold up the events", async () => {
    const { id, token } = await newHost();
    const run = new RunScript().start(PLAN).stepStart("preflight");
    mode = "hang";
    try {
      const started = Date.now();
      await sender(id, token, run)();
      expect(Date.now() - started).toBeLessThan(20_000);
      expect((await getHostRecordState(h.db, id))?.lastError).toMatch(/AdapterTimeoutError: onBootstrapStatus did not finish within 300 ms/);
    } finally {
      mode = "ok";
    }
  });

  it("events stored while no delivery ran (a hub that crashed first) are found and delivered by the sweep", async () => {
    const { id } = await newHost();
    const run = new RunScript().start(PLAN).stepStart("apt").progress("installing packages", 40);
    await insertEvents(h.db, id, run.events as never, new Date()); // straight into the store: no route, no reporter
    expect((await metadata(id)).metadata.bootstrap?.status).toBe("pending");
    await hub.hostRecords!.sweep();
    expect((await metadata(id)).metadata.bootstrap).toMatchObject({ status: "running", percent: 40 });
  });

  it("a burst of batches is coalesced: fewer calls than batches, and the last call carries the latest status", async () => {
    const { id, token } = await newHost();
    const run = new RunScript().start(PLAN);
    for (let i = 1; i <= 20; i++) run.progress(`step ${i}`, i * 4);
    const before = calls.filter((c) => c.hostId === id).length;
    // 21 batches of one event each, posted at once
    const answers = await Promise.all(run.events.map((e) => post(id, token, [e])));
    expect(answers.map((a) => a.status)).toEqual(run.events.map(() => 200));
    await hub.hostRecords!.flush();
    const mine = calls.filter((c) => c.hostId === id).slice(before);
    expect(mine.length).toBeGreaterThanOrEqual(1);
    expect(mine.length).toBeLessThanOrEqual(21);
    expect(mine.at(-1)!.status).toMatchObject({ status: "running", phase: "step 20", percent: 80 });
    // statuses one hub delivers for a host never go backwards
    const percents = mine.map((c) => c.status.percent);
    expect([...percents].sort((a, b) => a - b)).toEqual(percents);
  });

  it("two hubs on one database: a call that lands late with an older status is corrected by the hub that made it", async () => {
    const { id, token } = await newHost();
    let release: () => void = () => undefined;
    const held = new Promise<void>((r) => {
      release = r;
    });
    const seenByB: string[] = [];
    const slow: BootstrapStatusAdapter = {
      async onBootstrapStatus(hostId, status, ctx) {
        seenByB.push(status.status);
        if (seenByB.length === 1) await held; // hub B's first call is slow: it lands after hub A's newer one
        await table.onBootstrapStatus(hostId, status, ctx);
      },
    };
    const other = await startHub({
      db: h.db,
      artifactBaseUrl: srv.baseUrl,
      statusAdapter: slow,
      hostRecordsSweepMs: 0,
      hostRecordsTimeoutMs: 30_000,
      streamRecheckMs: 60_000,
    });
    const postTo = async (base: string, events: BootstrapEventInput[]) => {
      const r = await fetch(`${base}/hosts/${id}/events`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
        body: JSON.stringify({ host_id: id, events }),
      });
      expect(r.status).toBe(200);
    };
    try {
      const run = new RunScript().start(PLAN).progress("installing packages", 30);
      await postTo(other.bootstrapUrl, run.events); // hub B: running, its call held
      const more = run.events.length;
      run.stepStart("service").stepEnd("service", "changed", 3).end(true);
      await postTo(hub.bootstrapUrl, run.events.slice(more)); // hub A: done, delivered at once
      await hub.hostRecords!.flush();
      expect((await metadata(id)).metadata.bootstrap?.status).toBe("done");
      release(); // B's old "running" lands now, over A's "done"
      await other.hostRecords!.flush();
      expect(seenByB).toEqual(["running", "done"]); // B derived again after its call and corrected it
      expect((await metadata(id)).metadata.bootstrap).toMatchObject({ status: "done", percent: 100, run_id: run.runId });
    } finally {
      release();
      await other.close();
    }
  });
});

describe("bootstrapMetadata (the mapping)", () => {
  const now = new Date("2026-12-02T00:00:00Z");
  const opts = { hostId: "00000000-0000-4000-8000-000000000000", now, staleAfterS: 120 };

  it("a stale run is still running, and says it has not heard from the host", () => {
    const run = new RunScript("run-stale-0001", now.getTime() / 1000 - 600).start(PLAN).progress("installing packages", 30);
    const s = deriveStatus(
      run.events.map((e) => ({ event: e as never, receivedAt: new Date(now.getTime() - 590_000) })),
      opts,
    );
    expect(s.state).toBe("stale");
    expect(bootstrapMetadata(s, now)).toMatchObject({ status: "running", message: "installing packages (no news from the host for over 120s)" });
  });

  it("no events is pending", () => {
    expect(bootstrapMetadata(deriveStatus([], opts), now)).toMatchObject({ status: "pending", percent: 0, run_id: null });
  });

  it("a blocked service step is not healthy: a run whose service step was blocked cannot be done", () => {
    const run = new RunScript("run-blocked-01", now.getTime() / 1000 - 10).start(PLAN).stepEnd("service", "blocked", 0).end(true);
    const s = deriveStatus(
      run.events.map((e) => ({ event: e as never, receivedAt: now })),
      opts,
    );
    expect(s.state).toBe("done");
    expect(bootstrapMetadata(s, now).status).toBe("error");
  });
});
