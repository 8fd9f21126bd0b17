import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type ArtifactServer, parseRange, startArtifactServer } from "../src/artifact-server.js";

let dir: string;
let server: ArtifactServer;
const body = Buffer.from(Array.from({ length: 1000 }, (_, i) => i % 251));

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "artifact-server-"));
  writeFileSync(join(dir, "blob.bin"), body);
  writeFileSync(join(dir, "m.json"), "{}");
  server = await startArtifactServer({ root: dir });
});
afterAll(async () => {
  await server.close();
  rmSync(dir, { recursive: true, force: true });
});

describe("artifact server", () => {
  it("serves a whole file with its length and Accept-Ranges", async () => {
    const r = await fetch(`${server.url}/blob.bin`);
    expect(r.status).toBe(200);
    expect(r.headers.get("accept-ranges")).toBe("bytes");
    expect(Buffer.from(await r.arrayBuffer())).toEqual(body);
  });

  it("answers a Range request with 206 and exactly those bytes", async () => {
    const r = await fetch(`${server.url}/blob.bin`, { headers: { Range: "bytes=100-199" } });
    expect(r.status).toBe(206);
    expect(r.headers.get("content-range")).toBe("bytes 100-199/1000");
    expect(Buffer.from(await r.arrayBuffer())).toEqual(body.subarray(100, 200));
    const open = await fetch(`${server.url}/blob.bin`, { headers: { Range: "bytes=990-" } });
    expect(Buffer.from(await open.arrayBuffer())).toEqual(body.subarray(990));
  });

  it("refuses an unsatisfiable range with 416", async () => {
    const r = await fetch(`${server.url}/blob.bin`, { headers: { Range: "bytes=5000-" } });
    expect(r.status).toBe(416);
    expect(r.headers.get("content-range")).toBe("bytes */1000");
  });

  it("answers HEAD without a body and 404 outside the root", async () => {
    const head = await fetch(`${server.url}/m.json`, { method: "HEAD" });
    expect(head.status).toBe(200);
    expect(head.headers.get("content-length")).toBe("2");
    expect((await fetch(`${server.url}/%2e%2e/%2e%2e/etc/passwd`)).status).toBe(404);
    expect((await fetch(`${server.url}/missing`)).status).toBe(404);
  });

  it("logs every request", () => {
    expect(server.requests.some((r) => r.path === "/blob.bin" && r.status === 206)).toBe(true);
  });

  it("parses ranges like RFC 9110 says", () => {
    expect(parseRange("bytes=0-0", 10)).toEqual({ start: 0, end: 0 });
    expect(parseRange("bytes=-3", 10)).toEqual({ start: 7, end: 9 });
    expect(parseRange("bytes=5-100", 10)).toEqual({ start: 5, end: 9 });
    expect(parseRange("bytes=9-5", 10)).toBeNull();
    expect(parseRange("items=0-1", 10)).toBeNull();
  });
});

describe("artifact server limits", () => {
  it("shares one bandwidth limit between concurrent downloads", async () => {
    const big = mkdtempSync(join(tmpdir(), "artifact-bw-"));
    writeFileSync(join(big, "a"), Buffer.alloc(400_000, 1));
    writeFileSync(join(big, "b"), Buffer.alloc(400_000, 2));
    const limited = await startArtifactServer({ root: big, bandwidthBytesPerSec: 1_000_000 });
    try {
      const t0 = performance.now();
      await Promise.all(["a", "b"].map(async (f) => (await fetch(`${limited.url}/${f}`)).arrayBuffer()));
      const seconds = (performance.now() - t0) / 1000;
      // 800 kB at 1 MB/s shared: about 0.8 s (minus the initial burst of 0.1 s).
      expect(seconds).toBeGreaterThan(0.6);
      expect(seconds).toBeLessThan(2.5);
    } finally {
      await limited.close();
      rmSync(big, { recursive: true, force: true });
    }
  });

  it("delays the first byte by the configured latency", async () => {
    const slow = await startArtifactServer({ root: dir, latencyMs: 300 });
    try {
      const t0 = performance.now();
      await (await fetch(`${slow.url}/m.json`)).text();
      expect(performance.now() - t0).toBeGreaterThanOrEqual(290);
    } finally {
      await slow.close();
    }
  });
});
