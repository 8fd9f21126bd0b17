/**
 * The benchmark's apt cache (src/apt-cache.ts) against a real local HTTP
 * "mirror": what is cached and for how long, what is refused, and that a
 * broken upstream answer is never stored. Real apt goes through it in the
 * bench smoke test (test/bench-smoke.test.ts: the warm-up and every host).
 */
import { existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { createServer, request, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { type AptCache, cachePathFor, isImmutable, startAptCache } from "../src/apt-cache.js";

const deb = Buffer.from(Array.from({ length: 200_000 }, (_, i) => (i * 7) % 253));
let mirror: Server;
let origin: string;
/** Upstream requests by path. */
const hits = new Map<string, number>();
let indexVersion = 1;

beforeAll(async () => {
  mirror = createServer((req, res) => {
    const path = req.url ?? "";
    hits.set(path, (hits.get(path) ?? 0) + 1);
    if (path === "/debian/pool/main/a/a_1.0_amd64.deb") {
      // slow enough that concurrent requests overlap the fetch
      setTimeout(() => res.writeHead(200, { "Content-Length": deb.length }).end(deb), 100);
    } else if (path === "/debian/dists/stable/InRelease") {
      res.writeHead(200, { "Content-Type": "text/plain" }).end(`index v${indexVersion}\n`);
    } else if (path === "/debian/pool/main/t/truncated.deb") {
      res.writeHead(200, { "Content-Length": 1000 });
      res.write(Buffer.alloc(10));
      res.destroy();
    } else if (path === "/debian/dists/stable/moved") {
      res.writeHead(302, { Location: "/debian/dists/stable/InRelease" }).end();
    } else {
      res.writeHead(404).end("no\n");
    }
  });
  await new Promise<void>((r) => mirror.listen(0, "127.0.0.1", () => r()));
  origin = `http://127.0.0.1:${(mirror.address() as AddressInfo).port}`;
});
afterAll(() => new Promise<void>((r) => mirror.close(() => r())));

let dir: string;
let cache: AptCache;
beforeEach(async () => {
  hits.clear();
  dir = mkdtempSync(join(tmpdir(), "apt-cache-"));
  cache = await startAptCache({ dir, origins: [origin] });
});
afterEach(async () => {
  await cache.close();
  rmSync(dir, { recursive: true, force: true });
});

/** GET through the proxy the way apt does: an absolute URL as the request target. */
function viaProxy(target: string, method = "GET"): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port: cache.port, method, path: target }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
    });
    req.on("error", reject);
    req.end();
  });
}

describe("apt cache", () => {
  it("fetches a pool file once and serves the same bytes from the cache afterwards, also to a new process", async () => {
    const url = `${origin}/debian/pool/main/a/a_1.0_amd64.deb`;
    const first = await viaProxy(url);
    expect(first.status).toBe(200);
    expect(first.body.equals(deb)).toBe(true);
    expect((await viaProxy(url)).body.equals(deb)).toBe(true);
    expect(hits.get("/debian/pool/main/a/a_1.0_amd64.deb")).toBe(1);
    expect(cache.stats).toMatchObject({ hits: 1, misses: 1, bytesServed: 2 * deb.length });
    // a later invocation (same directory): pool files are immutable, no refetch
    const again = await startAptCache({ dir, origins: [origin] });
    try {
      const r = await new Promise<number>((resolve) => {
        request({ host: "127.0.0.1", port: again.port, path: url }, (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        }).end();
      });
      expect(r).toBe(200);
      expect(hits.get("/debian/pool/main/a/a_1.0_amd64.deb")).toBe(1);
    } finally {
      await again.close();
    }
  });

  it("fetches concurrent requests for one missing file once", async () => {
    const url = `${origin}/debian/pool/main/a/a_1.0_amd64.deb`;
    const all = await Promise.all(Array.from({ length: 6 }, () => viaProxy(url)));
    for (const r of all) expect(r.body.equals(deb)).toBe(true);
    expect(hits.get("/debian/pool/main/a/a_1.0_amd64.deb")).toBe(1);
  });

  it("refreshes an index file once per process, then serves that copy", async () => {
    const url = `${origin}/debian/dists/stable/InRelease`;
    indexVersion = 1;
    expect((await viaProxy(url)).body.toString()).toBe("index v1\n");
    indexVersion = 2;
    expect((await viaProxy(url)).body.toString()).toBe("index v1\n");
    expect(hits.get("/debian/dists/stable/InRelease")).toBe(1);
    const next = await startAptCache({ dir, origins: [origin] });
    try {
      const body = await new Promise<string>((resolve) => {
        request({ host: "127.0.0.1", port: next.port, path: url }, (res) => {
          let s = "";
          res.on("data", (c) => (s += c));
          res.on("end", () => resolve(s));
        }).end();
      });
      expect(body).toBe("index v2\n");
    } finally {
      await next.close();
    }
  });

  it("follows a redirect on the same mirror and stores the answer under the asked path", async () => {
    indexVersion = 3;
    const r = await viaProxy(`${origin}/debian/dists/stable/moved`);
    expect(r.status).toBe(200);
    expect(r.body.toString()).toBe("index v3\n");
  });

  it("passes a 404 on and stores nothing", async () => {
    const r = await viaProxy(`${origin}/debian/pool/main/n/none.deb`);
    expect(r.status).toBe(404);
    expect(existsSync(join(dir, origin.slice("http://".length).replace(":", "_"), "debian/pool/main/n/none.deb"))).toBe(false);
  });

  it("never stores a truncated answer (fewer bytes than Content-Length)", async () => {
    const r = await viaProxy(`${origin}/debian/pool/main/t/truncated.deb`);
    expect(r.status).toBe(502);
    const host = origin.slice("http://".length).replace(":", "_");
    const left = existsSync(join(dir, host, "debian/pool/main/t")) ? readdirSync(join(dir, host, "debian/pool/main/t")) : [];
    expect(left).toEqual([]);
  });

  it("is not an open proxy: other origins, relative targets, other methods, dot segments are refused", async () => {
    expect((await viaProxy("http://example.org/debian/pool/x.deb")).status).toBe(403);
    expect((await viaProxy("/debian/pool/x.deb")).status).toBe(403);
    expect((await viaProxy(`${origin}/debian/pool/x.deb`, "POST")).status).toBe(405);
    expect((await viaProxy(`${origin}/debian/%2e%2e/%2e%2e/etc/passwd`)).status).toBe(403);
    expect((await viaProxy(`${origin}/debian/pool/x.deb?a=b`)).status).toBe(403);
    expect(cache.stats.refused).toBe(5);
    expect(hits.size).toBe(0);
    expect(readdirSync(dir)).toEqual([]);
  });

  it("maps every request target into the cache directory or refuses it (property)", () => {
    const segment = fc.oneof(fc.constantFrom("..", ".", "%2e%2e", "%2E.", "", "pool", "by-hash", "a%00b", "%", "~x"), fc.string({ maxLength: 8 }));
    fc.assert(
      fc.property(fc.array(segment, { maxLength: 8 }), fc.constantFrom(origin, "http://example.org", "https://127.0.0.1", "file://"), (segs, o) => {
        const got = cachePathFor("/cache", `${o}/${segs.join("/")}`, [origin]);
        if ("refused" in got) return true;
        const base = `/cache/${origin.slice("http://".length).replace(":", "_")}/`;
        return got.file.startsWith(base) && !got.file.slice(base.length).split("/").includes("..") && got.url.origin === origin;
      }),
      { numRuns: 2000 },
    );
  });

  it("calls only pool and by-hash files immutable", () => {
    expect(isImmutable("/debian/pool/main/p/podman/podman_4.3.1_amd64.deb")).toBe(true);
    expect(isImmutable("/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/abc")).toBe(true);
    expect(isImmutable("/debian/dists/bookworm/InRelease")).toBe(false);
    expect(isImmutable("/debian/dists/bookworm/main/binary-amd64/Packages.gz")).toBe(false);
  });
});
