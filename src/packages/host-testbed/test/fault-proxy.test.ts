/**
 * The fault-injecting proxy against a real upstream (node:http on 127.0.0.1)
 * and a real client (node:http), each fault seen the way a downloader sees it.
 */
import { createHash } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { createServer, type IncomingHttpHeaders, request, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { type FaultProxy, startFaultProxy, unackedBytes } from "../src/faults/proxy.js";

const BODY = Buffer.alloc(1 << 20);
for (let i = 0; i < BODY.length; i++) BODY[i] = (i * 31 + 7) & 0xff;

interface Got {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
  /** How the body ended: "end" (complete), or the error / abort. */
  ended: string;
  firstByteMs: number;
}

function get(url: string, opts: { method?: string; body?: string; headers?: Record<string, string>; pauseMs?: number } = {}): Promise<Got> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const req = request(url, { method: opts.method ?? "GET", headers: opts.headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      let firstByteMs = -1;
      let settled = false;
      const done = (ended: string) => {
        if (settled) return;
        settled = true;
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks), ended, firstByteMs });
      };
      // Node.js 22 also emits a reset after the head on the request (20 did not): once
      // there is an answer, that error is how its body ended (settled by the
      // response's close, after every byte that arrived), not a failed request.
      let reqError: string | null = null;
      req.off("error", reject);
      req.on("error", (e: NodeJS.ErrnoException) => {
        reqError = e.code ?? e.message;
      });
      // a slow reader: nothing read for pauseMs (its receive window fills up)
      if (opts.pauseMs) {
        res.pause();
        setTimeout(() => res.resume(), opts.pauseMs);
      }
      res.on("data", (c: Buffer) => {
        if (firstByteMs < 0) firstByteMs = Date.now() - t0;
        chunks.push(c);
      });
      res.on("end", () => done(res.complete ? "end" : "incomplete"));
      res.on("aborted", () => done("aborted"));
      res.on("error", (e: NodeJS.ErrnoException) => done(e.code ?? e.message));
      res.on("close", () => done(res.complete ? "end" : (reqError ?? "incomplete")));
    });
    req.on("error", reject);
    req.end(opts.body);
  });
}

describe("fault proxy", () => {
  let upstream: Server;
  let upstreamUrl: string;
  let proxy: FaultProxy;
  const seen: { method: string; url: string; auth: string | undefined; body: string }[] = [];

  beforeAll(async () => {
    upstream = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        seen.push({ method: req.method!, url: req.url!, auth: req.headers.authorization, body: Buffer.concat(chunks).toString() });
        if (req.url!.startsWith("/echo")) {
          res.writeHead(201, { "Content-Type": "application/json" }).end(JSON.stringify({ got: Buffer.concat(chunks).toString() }));
          return;
        }
        res.writeHead(200, { "Content-Type": "application/octet-stream", "Content-Length": BODY.length });
        res.end(BODY);
      });
    });
    await new Promise<void>((r) => upstream.listen(0, "127.0.0.1", () => r()));
    upstreamUrl = `http://127.0.0.1:${(upstream.address() as AddressInfo).port}`;
    proxy = await startFaultProxy({ upstream: upstreamUrl });
  });

  afterEach(async () => {
    await proxy.clear();
  });

  afterAll(async () => {
    await proxy.close();
    upstream.closeAllConnections();
    await new Promise<void>((r) => upstream.close(() => r()));
  });

  it("forwards method, path, headers and body unchanged when no rule applies", async () => {
    const r = await get(`${proxy.url}/echo?x=1`, {
      method: "POST",
      body: '{"a":1}',
      headers: { Authorization: "Bearer t0k", "Content-Type": "application/json" },
    });
    expect(r.status).toBe(201);
    expect(JSON.parse(r.body.toString())).toEqual({ got: '{"a":1}' });
    expect(seen.at(-1)).toEqual({ method: "POST", url: "/echo?x=1", auth: "Bearer t0k", body: '{"a":1}' });
    const whole = await get(`${proxy.url}/file`);
    expect([whole.status, whole.ended, whole.body.equals(BODY)]).toEqual([200, "end", true]);
    expect(proxy.log.at(-1)).toMatchObject({ method: "GET", path: "/file", status: 200, bytes: BODY.length, fault: null });
  });

  it("status: the first N matching requests get the status, the upstream is not asked; then through", async () => {
    proxy.add({ kind: "status", status: 503, times: 2, match: /^\/file/ });
    const before = seen.length;
    const codes = [];
    for (let i = 0; i < 3; i++) codes.push((await get(`${proxy.url}/file`)).status);
    expect(codes).toEqual([503, 503, 200]);
    expect(seen.length - before).toBe(1);
    expect((await get(`${proxy.url}/echo`, { method: "POST", body: "x" })).status).toBe(201); // other paths untouched
    expect(proxy.fired("status")).toBe(2);
  });

  it("reset: the head and exactly K bytes, then a connection reset", async () => {
    proxy.add({ kind: "reset", afterBytes: 100_000, times: 1 });
    const r = await get(`${proxy.url}/file`);
    expect(r.status).toBe(200);
    expect(r.headers["content-length"]).toBe(String(BODY.length));
    expect(r.ended).not.toBe("end");
    expect(r.body.length).toBe(100_000);
    expect(r.body.equals(BODY.subarray(0, 100_000))).toBe(true);
    expect((await get(`${proxy.url}/file`)).body.length).toBe(BODY.length); // times: 1
  });

  it("reset: a client that reads slowly still gets exactly K bytes before the reset (more than its receive window)", async () => {
    // K > a loopback receive window (64 KiB at first): an RST sent while the
    // bytes wait in the proxy's send queue would discard them
    proxy.add({ kind: "reset", afterBytes: 600_000, times: 1 });
    const r = await get(`${proxy.url}/file`, { pauseMs: 300 });
    expect(r.ended).not.toBe("end");
    expect(r.body.length).toBe(600_000);
    expect(r.body.equals(BODY.subarray(0, 600_000))).toBe(true);
    expect(proxy.log.at(-1)).toMatchObject({ status: 200, bytes: 600_000, fault: "reset" });
  });

  it("truncate: the full Content-Length, K bytes, then a clean close", async () => {
    proxy.add({ kind: "truncate", afterBytes: 300_000 });
    const r = await get(`${proxy.url}/file`);
    expect(r.headers["content-length"]).toBe(String(BODY.length));
    expect(r.body.length).toBe(300_000);
    expect(r.ended).not.toBe("end");
  });

  it("corrupt: the same length, every byte from fromByte on different", async () => {
    proxy.add({ kind: "corrupt", fromByte: 1000 });
    const r = await get(`${proxy.url}/file`);
    expect([r.status, r.ended, r.body.length]).toEqual([200, "end", BODY.length]);
    expect(r.body.subarray(0, 1000).equals(BODY.subarray(0, 1000))).toBe(true);
    const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
    expect(sha(r.body)).not.toBe(sha(BODY));
    for (const i of [1000, 5000, BODY.length - 1]) expect(r.body[i]).toBe(BODY[i]! ^ 0xff);
  });

  it("stall: nothing for T ms (before the head, or after K bytes), then the rest", async () => {
    proxy.add({ kind: "stall", ms: 800, times: 1 });
    const r = await get(`${proxy.url}/file`);
    expect(r.firstByteMs).toBeGreaterThanOrEqual(750);
    expect(r.body.equals(BODY)).toBe(true);
    proxy.add({ kind: "stall", ms: 800, afterBytes: 500_000, times: 1 });
    const t0 = Date.now();
    const mid = await get(`${proxy.url}/file`);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(750);
    expect([mid.ended, mid.body.equals(BODY)]).toEqual(["end", true]);
  });

  it("rewrite: the upstream's answer with a new body and a matching Content-Length", async () => {
    proxy.add({ kind: "rewrite", match: /^\/echo/, transform: (b) => b.toString().replace("hello", "bye, and more") });
    const r = await get(`${proxy.url}/echo`, { method: "POST", body: "hello" });
    expect(r.status).toBe(201);
    expect(r.body.toString()).toBe(JSON.stringify({ got: "bye, and more" }));
    expect(r.headers["content-length"]).toBe(String(r.body.length));
  });

  it("drop: the connection closes without an answer", async () => {
    proxy.add({ kind: "drop", match: (r) => r.method === "POST" });
    await expect(get(`${proxy.url}/echo`, { method: "POST", body: "x" })).rejects.toThrow(/socket hang up|ECONNRESET/);
    expect((await get(`${proxy.url}/file`)).status).toBe(200);
  });

  it("refuseFor: connections are refused for the window, then accepted on the same port", async () => {
    const t0 = Date.now();
    const window = proxy.refuseFor(600);
    await new Promise((r) => setTimeout(r, 50));
    expect(proxy.refusing).toBe(true);
    expect(proxy.refusingSince).toBeGreaterThanOrEqual(t0);
    expect(proxy.refusingSince).toBeLessThanOrEqual(Date.now());
    await expect(get(`${proxy.url}/file`)).rejects.toMatchObject({ code: "ECONNREFUSED" });
    await window;
    expect(proxy.refusing).toBe(false);
    expect(proxy.refusingSince).toBeNull();
    expect((await get(`${proxy.url}/file`)).status).toBe(200);
  });

  it("refuseAfter: a matching request is answered, then connections are refused for the window", async () => {
    const p = await startFaultProxy({ upstream: upstreamUrl, refuseAfter: { match: /^\/config$/, ms: 500 } });
    try {
      expect((await get(`${p.url}/file`)).status).toBe(200);
      expect((await get(`${p.url}/config`)).status).toBe(200);
      await new Promise((r) => setTimeout(r, 50));
      await expect(get(`${p.url}/file`)).rejects.toMatchObject({ code: "ECONNREFUSED" });
      await new Promise((r) => setTimeout(r, 600));
      expect((await get(`${p.url}/file`)).status).toBe(200);
    } finally {
      await p.close();
    }
  });

  it("unackedBytes: the tx_queue of the established row local:port -> remote:port, null when absent", () => {
    const table = `${mkdtempSync(`${tmpdir()}/proc-net-tcp-`)}/tcp`;
    writeFileSync(
      table,
      [
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0",
        "   1: 0100007F:1F90 0100007F:C350 01 000086A4:00000000 01:00000014 00000000     0        0 2 1 0",
        "   2: 0100007F:C350 0100007F:1F90 01 00000000:00010000 00:00000000 00000000     0        0 3 1 0",
        "   3: 0100007F:1F90 0100007F:C351 06 00000010:00000000 00:00000000 00000000     0        0 0 3 0",
        "",
      ].join("\n"),
    );
    expect(unackedBytes(8080, 50000, table)).toBe(0x86a4);
    expect(unackedBytes(50000, 8080, table)).toBe(0);
    expect(unackedBytes(8080, 50001, table)).toBeNull(); // TIME_WAIT: not a live connection
    expect(unackedBytes(8080, 50002, table)).toBeNull();
    expect(unackedBytes(8080, 50000, `${table}.missing`)).toBeNull();
  });
});
