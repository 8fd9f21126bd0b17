import { createHash, randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { BOOTSTRAP_PY_PATH, type BootstrapEventInput, bootstrapPyBytes, bootstrapPySha256 } from "@cocalc/project-host-bootstrap";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { type Db, openPglite, type Queryable } from "../cloud/bootstrap/db.js";
import { type RunningHub, startHub } from "../cloud/bootstrap/hub.js";
import type { HostStatus } from "../cloud/bootstrap/status.js";
import { listRunEvents } from "../cloud/bootstrap/store.js";
import { issueToken } from "../cloud/bootstrap/tokens.js";
import { openTestPostgres } from "./support/databases.js";
import { hostRecord, RunScript } from "./support/fixtures.js";
import { type ManifestServer, serveGoodManifests, startManifestServer } from "./support/manifest-server.js";
import { SseClient } from "./support/sse.js";

const SECRET = "conat-secret-value-0123456789";

let srv: ManifestServer;
let db: Db;
let hub: RunningHub;
const logged: string[] = [];
let hostId: string;
let token: string;
let otherToken: string;

beforeAll(async () => {
  srv = await startManifestServer();
  serveGoodManifests(srv);
  db = await openPglite();
  hub = await startHub({
    db,
    artifactBaseUrl: srv.baseUrl,
    settings: { secret_names: ["conat-password"] },
    enableAdmin: true,
    streamRecheckMs: 60_000,
    logError: (m, e) => logged.push(`${m} ${String(e)}`),
  });
  const host = await hub.provisionHost(hostRecord(), { secrets: { "conat-password": SECRET } });
  hostId = host.hostId;
  token = host.token;
  otherToken = (await hub.provisionHost(hostRecord(), { secrets: { "conat-password": "other" } })).token;
});

afterAll(async () => {
  await hub?.close();
  await db?.close();
  await srv?.close();
  // Nothing the routes logged may contain a secret or a token.
  for (const line of logged) {
    expect(line).not.toContain(SECRET);
    expect(line).not.toContain(token);
  }
});

const url = (path: string) => `${hub.bootstrapUrl}${path}`;
const auth = (t: string) => ({ authorization: `Bearer ${t}` });

function post(path: string, body: unknown, t: string | null = token, raw?: string) {
  return fetch(url(path), {
    method: "POST",
    headers: { "content-type": "application/json", ...(t ? auth(t) : {}) },
    body: raw ?? JSON.stringify(body),
  });
}

function batch(events: BootstrapEventInput[], id = hostId) {
  return { host_id: id, events };
}

describe("GET bootstrap.py", () => {
  // The packaged asset as this process loaded it (the same bytes its stubs' sha256 came from).
  const expected = bootstrapPyBytes();
  const sha = bootstrapPySha256();

  it("the asset is the packaged file", () => {
    expect(readFileSync(BOOTSTRAP_PY_PATH).length).toBeGreaterThan(1000);
    expect(createHash("sha256").update(expected).digest("hex")).toBe(sha);
  });

  for (const path of ["/bootstrap.py", () => `/hosts/${hostId}/bootstrap.py`]) {
    it(`serves the packaged bytes and their sha256 at ${typeof path === "string" ? path : "/hosts/:id/bootstrap.py"}`, async () => {
      const res = await fetch(url(typeof path === "string" ? path : path()));
      expect(res.status).toBe(200);
      expect(res.headers.get("x-bootstrap-sha256")).toBe(sha);
      const body = Buffer.from(await res.arrayBuffer());
      expect(body.equals(expected)).toBe(true);
      expect(createHash("sha256").update(body).digest("hex")).toBe(sha);
    });
  }
});

describe("GET config", () => {
  it("200 with the host's own token", async () => {
    const res = await fetch(url(`/hosts/${hostId}/config`), { headers: auth(token) });
    expect(res.status).toBe(200);
    const config = (await res.json()) as { host: { id: string }; hub: { url: string } };
    expect(config.host.id).toBe(hostId);
    expect(config.hub.url).toBe(`${hub.bootstrapUrl}/hosts/${hostId}`);
  });

  it("fills in the public IP the hub does not know from the caller's address (never a third-party service)", async () => {
    const res = await fetch(url(`/hosts/${hostId}/config`), { headers: auth(token) });
    const config = (await res.json()) as { daemon: { public_ip: string | null } };
    expect(config.daemon.public_ip).toBe("127.0.0.1"); // the test calls from loopback
    const known = await hub.provisionHost({ ...hostRecord(), public_ip: "203.0.113.8" }, { secrets: { "conat-password": "x" } });
    const theirs = (await (await fetch(url(`/hosts/${known.hostId}/config`), { headers: auth(known.token) })).json()) as typeof config;
    expect(theirs.daemon.public_ip).toBe("203.0.113.8"); // the record's value wins
  });

  it("401 without a token, with a Bearer challenge", async () => {
    const res = await fetch(url(`/hosts/${hostId}/config`));
    expect(res.status).toBe(401);
    expect(res.headers.get("www-authenticate")).toMatch(/^Bearer/);
    expect(await res.json()).toEqual({ error: "no credential: send Authorization: Bearer <host credential>", code: "missing" });
  });

  it("401 with an unknown token", async () => {
    const res = await fetch(url(`/hosts/${hostId}/config`), { headers: auth("x".repeat(43)) });
    expect(res.status).toBe(401);
  });

  it("403 with another host's token", async () => {
    const res = await fetch(url(`/hosts/${hostId}/config`), { headers: auth(otherToken) });
    expect(res.status).toBe(403);
    expect(await res.json()).toEqual({ error: "token belongs to another host", code: "foreign_host" });
  });

  it("400 for a bad host id", async () => {
    const res = await fetch(url(`/hosts/not-a-uuid/config`), { headers: auth(token) });
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: string }).error).toMatch(/invalid host id: must be a lowercase UUID/);
  });

  it("404 when the host has a token but no config", async () => {
    const id = randomUUID();
    const t = await issueToken(db, id);
    const res = await fetch(url(`/hosts/${id}/config`), { headers: auth(t.token) });
    expect(res.status).toBe(404);
  });
});

describe("GET secrets", () => {
  it("200 with the secret as text", async () => {
    const res = await fetch(url(`/hosts/${hostId}/secrets/conat-password`), { headers: auth(token) });
    expect(res.status).toBe(200);
    expect(res.headers.get("cache-control")).toBe("no-store");
    expect(await res.text()).toBe(SECRET);
  });
  it("401, 403, 400 and 404", async () => {
    expect((await fetch(url(`/hosts/${hostId}/secrets/conat-password`))).status).toBe(401);
    expect((await fetch(url(`/hosts/${hostId}/secrets/conat-password`), { headers: auth(otherToken) })).status).toBe(403);
    expect((await fetch(url(`/hosts/${hostId}/secrets/Bad%20Name`), { headers: auth(token) })).status).toBe(400);
    expect((await fetch(url(`/hosts/${hostId}/secrets/nope`), { headers: auth(token) })).status).toBe(404);
  });
});

describe("POST events", () => {
  it("stores a batch, and a replay stores nothing new", async () => {
    const run = new RunScript().start().stepStart("preflight");
    const first = await post(`/hosts/${hostId}/events`, batch(run.events));
    expect(first.status).toBe(200);
    expect(await first.json()).toEqual({ stored: 2, duplicates: 0 });
    const again = await post(`/hosts/${hostId}/events`, batch(run.events));
    expect(await again.json()).toEqual({ stored: 0, duplicates: 2 });
  });

  it("stores out-of-order batches in seq order", async () => {
    const run = new RunScript().start().stepStart("preflight").stepEnd("preflight", "changed").stepStart("apt").progress("apt", 30).stepEnd("apt", "changed");
    const late = run.events.slice(3);
    const early = run.events.slice(0, 3);
    expect((await post(`/hosts/${hostId}/events`, batch(late))).status).toBe(200);
    expect((await post(`/hosts/${hostId}/events`, batch(early))).status).toBe(200);
    const stored = await listRunEvents(db, hostId, run.runId);
    expect(stored.map((e) => e.event.seq)).toEqual([0, 1, 2, 3, 4, 5]);
    expect(stored.map((e) => e.event.type)).toEqual(["run_start", "step_start", "step_end", "step_start", "progress", "step_end"]);
  });

  it("422 for a batch that fails the event schema, with the reason", async () => {
    const run = new RunScript().start();
    const bad = { ...run.events[0], seq: -1 };
    const res = await post(`/hosts/${hostId}/events`, batch([bad as BootstrapEventInput]));
    expect(res.status).toBe(422);
    expect(((await res.json()) as { error: string }).error).toMatch(/^invalid event batch: events\.0\.seq: /);
  });

  it("422 for a batch naming another host", async () => {
    const res = await post(`/hosts/${hostId}/events`, batch(new RunScript().start().events, randomUUID()));
    expect(res.status).toBe(422);
    expect(await res.json()).toEqual({ error: "invalid event batch: host_id: does not match the URL" });
  });

  it("400 for a body that is not JSON", async () => {
    const res = await post(`/hosts/${hostId}/events`, null, token, "{nope");
    expect(res.status).toBe(400);
    expect(await res.json()).toEqual({ error: "request body is not valid JSON" });
  });

  it("413 for a body over the limit", async () => {
    const res = await post(`/hosts/${hostId}/events`, null, token, JSON.stringify({ pad: "x".repeat(1024 * 1024 + 10) }));
    expect(res.status).toBe(413);
  });

  it("401 and 403 before reading the body", async () => {
    expect((await post(`/hosts/${hostId}/events`, batch(new RunScript().start().events), null)).status).toBe(401);
    expect((await post(`/hosts/${hostId}/events`, batch(new RunScript().start().events), otherToken)).status).toBe(403);
  });
});

describe("status and stream", () => {
  it("GET status: 200 with the status model, 404 for an unknown host, 400 for a bad id", async () => {
    const res = await fetch(url(`/hosts/${hostId}/status`));
    expect(res.status).toBe(200);
    const s = (await res.json()) as HostStatus;
    expect(s.host_id).toBe(hostId);
    expect(s.state).toBe("running");
    expect((await fetch(url(`/hosts/${randomUUID()}/status`))).status).toBe(404);
    expect((await fetch(url(`/hosts/xyz/status`))).status).toBe(400);
  });

  it("the stream sends the status, then every change", async () => {
    const { hostId: id, token: t } = await hub.provisionHost(hostRecord(), { secrets: { "conat-password": "p" } });
    const sse = await new SseClient().open(url(`/hosts/${id}/stream`));
    try {
      expect(sse.status).toBe(200);
      expect(sse.contentType).toMatch(/^text\/event-stream/);
      const first = JSON.parse((await sse.next((e) => e.event === "status")).data) as HostStatus;
      expect(first.state).toBe("pending");
      const run = new RunScript().start().stepStart("preflight").progress("preflight", 12);
      expect((await post(`/hosts/${id}/events`, batch(run.events, id), t)).status).toBe(200);
      const next = await sse.next((e) => e.event === "status" && (JSON.parse(e.data) as HostStatus).percent === 12);
      expect((JSON.parse(next.data) as HostStatus).current_steps).toEqual(["preflight"]);
    } finally {
      sse.close();
    }
  });
});

describe("page and the rest", () => {
  it("redirects to the trailing slash and serves the page, its script and its style sheet", async () => {
    const r = await fetch(url(`/hosts/${hostId}`), { redirect: "manual" });
    expect(r.status).toBe(301);
    expect(r.headers.get("location")).toBe(`/bootstrap/hosts/${hostId}/`);
    const page = await fetch(url(`/hosts/${hostId}/`));
    expect(page.status).toBe(200);
    expect(await page.text()).toContain('<script type="module" src="progress-page.js">');
    const js = await fetch(url(`/hosts/${hostId}/progress-page.js`));
    expect(js.status).toBe(200);
    expect(js.headers.get("content-type")).toMatch(/javascript/);
    const css = await fetch(url(`/hosts/${hostId}/progress-page.css`));
    expect(css.status).toBe(200);
    expect(css.headers.get("content-type")).toMatch(/^text\/css/);
    expect(await css.text()).toContain(".badge");
  });

  it("404 for unknown routes", async () => {
    expect((await fetch(url(`/nope`))).status).toBe(404);
    expect((await fetch(`${hub.url}/elsewhere`)).status).toBe(404);
  });

  it("admin provisioning: 201 with stub and token from loopback, 400 for a bad record", async () => {
    const record = hostRecord();
    const res = await fetch(`${hub.url}/admin/hosts`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ record, secrets: { "conat-password": "pw" } }),
    });
    expect(res.status).toBe(201);
    const body = (await res.json()) as { host_id: string; token: string; stub: string; page_url: string };
    expect(body.host_id).toBe(record.id);
    expect(body.stub).toContain(body.token);
    expect(body.page_url).toBe(`${hub.bootstrapUrl}/hosts/${record.id}/`);
    const bad = await fetch(`${hub.url}/admin/hosts`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ record: { ...record, id: randomUUID(), arch: "sparc" } }),
    });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: string }).error).toMatch(/arch/);
  });
});

describe("internal errors", () => {
  it("500 without the internal message", async () => {
    const detail = "connection to db-7.internal:5432 refused";
    const broken: Db = {
      ...db,
      kind: db.kind,
      query: async () => {
        throw new Error(detail);
      },
      exec: db.exec.bind(db),
      transaction: db.transaction.bind(db),
      listen: db.listen.bind(db),
      close: async () => undefined,
    } satisfies Db & Queryable;
    const seen: string[] = [];
    const h = await startHub({ db: broken, artifactBaseUrl: srv.baseUrl, logError: (m, e) => seen.push(`${m}: ${String(e)}`) }).catch((e: Error) => e);
    // migrate() uses a transaction, which still works; the routes' queries fail.
    expect(h).not.toBeInstanceOf(Error);
    const running = h as RunningHub;
    try {
      const res = await fetch(`${running.bootstrapUrl}/hosts/${hostId}/status`);
      expect(res.status).toBe(500);
      const text = await res.text();
      expect(text).toBe('{"error":"internal error"}');
      expect(seen.join("\n")).toContain(detail);
    } finally {
      await running.close();
    }
  });
});

describe("several hubs on one PostgreSQL", () => {
  const pgInfo = inject("postgres");
  it.skipIf(pgInfo.skipped !== null)("a stream on hub B hears events posted to hub A (LISTEN/NOTIFY)", async () => {
    if (pgInfo.error) throw new Error(pgInfo.error);
    const dbA = await openTestPostgres();
    const { pgDbFromUrl } = await import("../cloud/bootstrap/db.js");
    const rows = await dbA.query<{ db: string }>("SELECT current_database() AS db");
    const u = new URL(pgInfo.url!);
    u.pathname = `/${rows[0]!.db}`;
    const dbB = pgDbFromUrl(u.toString());
    // No periodic recheck within the test's time: only NOTIFY can deliver the change.
    const a = await startHub({ db: dbA, artifactBaseUrl: srv.baseUrl, streamRecheckMs: 600_000 });
    const b = await startHub({ db: dbB, artifactBaseUrl: srv.baseUrl, streamRecheckMs: 600_000 });
    const sse = new SseClient();
    try {
      const host = await a.provisionHost(hostRecord(), { secrets: {} });
      await sse.open(`${b.bootstrapUrl}/hosts/${host.hostId}/stream`);
      expect((JSON.parse((await sse.next()).data) as HostStatus).state).toBe("pending");
      const run = new RunScript().start().stepStart("preflight").progress("preflight", 7);
      const res = await fetch(`${a.bootstrapUrl}/hosts/${host.hostId}/events`, {
        method: "POST",
        headers: { "content-type": "application/json", ...auth(host.token) },
        body: JSON.stringify(batch(run.events, host.hostId)),
      });
      expect(res.status).toBe(200);
      const s = JSON.parse((await sse.next((e) => (JSON.parse(e.data) as HostStatus).percent === 7, 5000)).data) as HostStatus;
      expect(s.state).toBe("running");
    } finally {
      sse.close();
      await a.close();
      await b.close();
      await dbA.close();
      await dbB.close();
    }
  });
});
