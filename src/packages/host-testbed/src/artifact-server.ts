/**
 * A static HTTP server for the test artifacts on 127.0.0.1: GET and HEAD,
 * single `Range` requests (206 / 416), an optional bandwidth limit shared by
 * all downloads (one token bucket, bytes per second) and an optional
 * first-byte latency. The benchmark uses the limit to compare the bootstrap's
 * download throughput with what the link allows.
 */
import { createReadStream, statSync } from "node:fs";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { extname, join, normalize, sep } from "node:path";
import { Transform, type TransformCallback } from "node:stream";
import { pipeline } from "node:stream/promises";

export interface ArtifactServerOptions {
  root: string;
  port?: number;
  host?: string;
  /** Shared limit for all response bodies together, bytes/s; 0 or absent means unlimited. */
  bandwidthBytesPerSec?: number;
  /** A bucket shared with other servers (the benchmark's apt cache): overrides bandwidthBytesPerSec. */
  bucket?: TokenBucket;
  /** Delay before the first byte of every response, ms. */
  latencyMs?: number;
  /** Called for every request (method, path, status, bytes sent). */
  onRequest?: (entry: RequestLogEntry) => void;
}

export interface RequestLogEntry {
  method: string;
  path: string;
  status: number;
  range: string | null;
  bytes: number;
}

export interface ArtifactServer {
  url: string;
  port: number;
  /** Every request so far, oldest first (tests assert "no download happened"). */
  requests: RequestLogEntry[];
  close(): Promise<void>;
}

/**
 * Token bucket shared by every response. Capacity is a tenth of a second's
 * worth, so a burst cannot beat the rate by much and concurrent downloads
 * share the link instead of each getting the full rate.
 */
export class TokenBucket {
  private tokens: number;
  private last = performance.now();
  private readonly capacity: number;

  constructor(private readonly rate: number) {
    this.capacity = Math.max(64 * 1024, rate / 10);
    this.tokens = this.capacity;
  }

  /** Resolves when `n` bytes may be sent. */
  async take(n: number): Promise<void> {
    for (;;) {
      this.refill();
      if (this.tokens >= Math.min(n, this.capacity)) {
        this.tokens -= n;
        return;
      }
      const wait = ((Math.min(n, this.capacity) - this.tokens) / this.rate) * 1000;
      await new Promise((r) => setTimeout(r, Math.max(1, wait)));
    }
  }

  private refill(): void {
    const now = performance.now();
    this.tokens = Math.min(this.capacity, this.tokens + ((now - this.last) / 1000) * this.rate);
    this.last = now;
  }
}

const CHUNK = 16 * 1024;

/** A stream that paces what passes through it by `bucket` (16 KiB pieces). */
export function throttle(bucket: TokenBucket): Transform {
  return new Transform({
    transform(chunk: Buffer, _enc, done: TransformCallback) {
      void (async () => {
        for (let off = 0; off < chunk.length; off += CHUNK) {
          const piece = chunk.subarray(off, off + CHUNK);
          await bucket.take(piece.length);
          this.push(piece);
        }
        done();
      })().catch(done);
    },
  });
}

const TYPES: Record<string, string> = {
  ".json": "application/json",
  ".txt": "text/plain; charset=utf-8",
  ".sha256": "text/plain; charset=utf-8",
  ".xz": "application/x-xz",
  ".gz": "application/gzip",
  ".zst": "application/zstd",
};

/** `bytes=a-b`, `bytes=a-`, `bytes=-n` (one range only). null: not satisfiable. */
export function parseRange(header: string, size: number): { start: number; end: number } | null {
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === "" && m[2] === "")) return null;
  let start: number;
  let end: number;
  if (m[1] === "") {
    start = Math.max(0, size - Number(m[2]));
    end = size - 1;
  } else {
    start = Number(m[1]);
    end = m[2] === "" ? size - 1 : Math.min(Number(m[2]), size - 1);
  }
  if (start > end || start >= size) return null;
  return { start, end };
}

/** Map a URL path to a file under root; null when it tries to leave root. */
function resolvePath(root: string, urlPath: string): string | null {
  let decoded: string;
  try {
    decoded = decodeURIComponent(urlPath.split("?")[0] ?? "/");
  } catch {
    return null;
  }
  if (decoded.includes("\0")) return null;
  const full = normalize(join(root, decoded));
  return full === root || full.startsWith(root.endsWith(sep) ? root : root + sep) ? full : null;
}

export function startArtifactServer(opts: ArtifactServerOptions): Promise<ArtifactServer> {
  const root = normalize(opts.root);
  const bucket = opts.bucket ?? (opts.bandwidthBytesPerSec ? new TokenBucket(opts.bandwidthBytesPerSec) : null);
  const requests: RequestLogEntry[] = [];

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const entry: RequestLogEntry = { method: req.method ?? "", path: req.url ?? "", status: 0, range: req.headers.range ?? null, bytes: 0 };
    const finish = (status: number) => {
      entry.status = status;
      requests.push(entry);
      opts.onRequest?.(entry);
    };
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { Allow: "GET, HEAD" }).end();
      return finish(405);
    }
    const file = resolvePath(root, req.url ?? "/");
    let size: number;
    try {
      if (!file) throw new Error("outside root");
      const st = statSync(file);
      if (!st.isFile()) throw new Error("not a file");
      size = st.size;
    } catch {
      res.writeHead(404, { "Content-Type": "text/plain" }).end("not found\n");
      return finish(404);
    }
    if (opts.latencyMs) await new Promise((r) => setTimeout(r, opts.latencyMs));
    let start = 0;
    let end = size - 1;
    let status = 200;
    if (req.headers.range) {
      const range = parseRange(req.headers.range, size);
      if (!range) {
        res.writeHead(416, { "Content-Range": `bytes */${size}` }).end();
        return finish(416);
      }
      ({ start, end } = range);
      status = 206;
    }
    const headers: Record<string, string | number> = {
      "Content-Type": TYPES[extname(file!)] ?? "application/octet-stream",
      "Content-Length": size === 0 ? 0 : end - start + 1,
      "Accept-Ranges": "bytes",
    };
    if (status === 206) headers["Content-Range"] = `bytes ${start}-${end}/${size}`;
    res.writeHead(status, headers);
    if (req.method === "HEAD" || size === 0) {
      res.end();
      return finish(status);
    }
    const body = createReadStream(file!, { start, end, highWaterMark: 256 * 1024 });
    body.on("data", (b) => (entry.bytes += (b as Buffer).length));
    finish(status);
    try {
      await (bucket ? pipeline(body, throttle(bucket), res) : pipeline(body, res));
    } catch {
      // client went away (the bootstrap's resume test does that on purpose)
    }
  }

  const server: Server = createServer((req, res) => {
    handle(req, res).catch(() => {
      if (!res.headersSent) res.writeHead(500).end();
      else res.destroy();
    });
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(opts.port ?? 0, opts.host ?? "127.0.0.1", () => {
      const { port } = server.address() as AddressInfo;
      resolve({
        url: `http://${opts.host ?? "127.0.0.1"}:${port}`,
        port,
        requests,
        close: () =>
          new Promise<void>((r) => {
            server.closeAllConnections();
            server.close(() => r());
          }),
      });
    });
  });
}
