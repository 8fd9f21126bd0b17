/**
 * A caching HTTP proxy for apt, on 127.0.0.1, for the benchmark's hosts.
 *
 * Why: in the benchmark every cold run installs the same packages. Fetched
 * from the real mirror each time, `apt-get install` varied 2x from run to run
 * (21–70 s for the same list) and was outside the bench's bandwidth limit, so
 * it set every lower bound and drowned every other figure. Through this proxy
 * the packages come from a local cache, through the *same* token bucket as the
 * artifacts (one link per host, as on a cloud VM whose mirror is in the same
 * region), so apt's downloads are part of the measured and bounded work.
 *
 * What it does: apt on a host is pointed at it with `Acquire::http::Proxy`.
 * A request is `GET http://<mirror>/<path>`; only origins of this machine's
 * own apt sources (and HOST_TESTBED_DEBIAN_MIRROR) are served, anything else
 * is refused 403 (it is not an open proxy). Pool files and by-hash files are
 * immutable by name and cached on disk across invocations; index files
 * (`dists/...` InRelease, Release, Packages) are fetched from the mirror the
 * first time this process is asked for them and served from the cache after
 * that, so one invocation sees one consistent archive and a later one sees
 * the mirror's current state. Only 200 answers are cached; others are passed
 * on. apt's `Range` and `If-Modified-Since` are ignored (a full 200 answer is
 * always valid HTTP for them).
 */
import { createReadStream, createWriteStream, existsSync, mkdirSync, renameSync, rmSync, statSync } from "node:fs";
import { createServer, get as httpGet, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { dirname, join } from "node:path";
import { pipeline } from "node:stream/promises";
import { mirrorOverride, readAptSources } from "./apt-sources.js";
import { type TokenBucket, throttle } from "./artifact-server.js";

export interface AptCacheOptions {
  /** Cache directory (created). */
  dir: string;
  /** Origins (`http://host[:port]`) that may be fetched; default: this machine's apt sources. */
  origins?: string[];
  log?: (line: string) => void;
  /** Upstream fetch timeout, ms (no byte for that long). */
  upstreamTimeoutMs?: number;
}

export interface AptCacheStats {
  requests: number;
  hits: number;
  misses: number;
  refused: number;
  /** Response body bytes sent to apt clients. */
  bytesServed: number;
}

export interface AptCache {
  /** `http://127.0.0.1:<port>/`, for `Acquire::http::Proxy`. */
  url: string;
  port: number;
  stats: AptCacheStats;
  /** Responses are paced by this bucket from now on (null: unlimited). */
  setBucket(bucket: TokenBucket | null): void;
  /** The apt.conf snippet that points a host's apt at this proxy. */
  aptConf(): string;
  close(): Promise<void>;
}

/** The http origins of this machine's apt sources (https sources cannot be cached by a proxy and are skipped). */
export function aptOrigins(): string[] {
  const uris = readAptSources().map((s) => s.uri);
  const override = mirrorOverride();
  if (override) uris.push(override);
  const out = new Set<string>();
  for (const u of uris) {
    try {
      const url = new URL(u);
      if (url.protocol === "http:") out.add(url.origin);
    } catch {
      // not a URL: apt would not use it either
    }
  }
  return [...out];
}

/** Immutable by name: pool files and by-hash index files. */
export function isImmutable(path: string): boolean {
  return /\/pool\//.test(path) || /\/by-hash\//.test(path);
}

const SAFE_PATH = /^\/[A-Za-z0-9._~+%:@/-]*$/;

/**
 * The cache file for an absolute request URL, or why it is refused.
 * Exported for the tests (hostile request lines).
 */
export function cachePathFor(dir: string, requestUrl: string, origins: readonly string[]): { file: string; url: URL } | { refused: string } {
  // The URL parser resolves dot segments (also %2e ones) away: refuse them before it does.
  if (/\/(?:\.|%2e){1,2}(?:[/?#]|$)/i.test(requestUrl)) return { refused: "path has dot segments" };
  let url: URL;
  try {
    url = new URL(requestUrl);
  } catch {
    return { refused: "not an absolute http URL (this is a proxy: apt sends GET http://mirror/path)" };
  }
  if (url.protocol !== "http:") return { refused: `scheme ${url.protocol} is not proxied` };
  if (!origins.includes(url.origin)) return { refused: `origin ${url.origin} is not one of this machine's apt sources` };
  if (url.search || url.hash) return { refused: "query strings are not cached" };
  const path = url.pathname;
  if (!SAFE_PATH.test(path) || path.split("/").some((seg) => seg === ".." || seg === ".") || path.endsWith("/")) {
    return { refused: "path is not a plain file path" };
  }
  let decoded: string;
  try {
    decoded = decodeURIComponent(path);
  } catch {
    return { refused: "path is not valid percent-encoding" };
  }
  if (decoded.includes("\0") || decoded.split("/").some((seg) => seg === ".." || seg === ".")) return { refused: "path is not a plain file path" };
  const file = join(dir, url.host.replace(/:/g, "_"), decoded);
  if (!file.startsWith(`${join(dir, url.host.replace(/:/g, "_"))}/`)) return { refused: "path leaves the cache" };
  return { file, url };
}

export function startAptCache(opts: AptCacheOptions): Promise<AptCache> {
  const origins = opts.origins ?? aptOrigins();
  const log = opts.log ?? (() => {});
  const timeoutMs = opts.upstreamTimeoutMs ?? 60_000;
  mkdirSync(opts.dir, { recursive: true });
  const stats: AptCacheStats = { requests: 0, hits: 0, misses: 0, refused: 0, bytesServed: 0 };
  let bucket: TokenBucket | null = null;
  /** Index files refreshed by this process (served from the cache afterwards). */
  const fresh = new Set<string>();
  /** Fetches in flight, so concurrent requests for one file fetch it once. */
  const inflight = new Map<string, Promise<number>>();

  /** Fetch url into file (via a .part); resolves with the upstream status (only 200 is stored). */
  function fetchUpstream(url: URL, file: string, redirects = 3): Promise<number> {
    return new Promise((resolve, reject) => {
      const req = httpGet(url, { timeout: timeoutMs, headers: { "User-Agent": "cocalc-host-testbed-apt-cache" } }, (up: IncomingMessage) => {
        const status = up.statusCode ?? 502;
        const location = up.headers.location;
        if (status >= 300 && status < 400 && location && redirects > 0) {
          up.resume();
          let next: URL;
          try {
            next = new URL(location, url);
          } catch {
            resolve(502);
            return;
          }
          if (next.protocol !== "http:") {
            resolve(502);
            return;
          }
          fetchUpstream(next, file, redirects - 1).then(resolve, reject);
          return;
        }
        if (status !== 200) {
          up.resume();
          resolve(status);
          return;
        }
        mkdirSync(dirname(file), { recursive: true });
        const part = `${file}.part-${process.pid}-${Math.random().toString(36).slice(2)}`;
        pipeline(up, createWriteStream(part, { mode: 0o644 }))
          .then(() => {
            const expected = Number(up.headers["content-length"] ?? Number.NaN);
            if (Number.isFinite(expected) && statSync(part).size !== expected) {
              rmSync(part, { force: true });
              resolve(502);
              return;
            }
            renameSync(part, file);
            resolve(200);
          })
          .catch((e) => {
            rmSync(part, { force: true });
            reject(e);
          });
      });
      req.on("timeout", () => req.destroy(new Error(`no answer from ${url.origin} in ${timeoutMs} ms`)));
      req.on("error", reject);
    });
  }

  async function ensure(url: URL, file: string): Promise<number> {
    const key = file;
    const cached = existsSync(file);
    if (cached && (isImmutable(url.pathname) || fresh.has(key))) {
      stats.hits++;
      return 200;
    }
    let p = inflight.get(key);
    if (!p) {
      stats.misses++;
      p = fetchUpstream(url, file).finally(() => inflight.delete(key));
      inflight.set(key, p);
    }
    const status = await p;
    if (status === 200) fresh.add(key);
    return status;
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    stats.requests++;
    if (req.method !== "GET" && req.method !== "HEAD") {
      stats.refused++;
      res.writeHead(405, { Allow: "GET, HEAD", "Content-Type": "text/plain" }).end("apt cache: only GET and HEAD\n");
      return;
    }
    const target = cachePathFor(opts.dir, req.url ?? "", origins);
    if ("refused" in target) {
      stats.refused++;
      res.writeHead(403, { "Content-Type": "text/plain" }).end(`apt cache: ${target.refused}\n`);
      return;
    }
    let status: number;
    try {
      status = await ensure(target.url, target.file);
    } catch (e) {
      log(`apt cache: ${target.url.href}: ${e instanceof Error ? e.message : String(e)}`);
      res.writeHead(502, { "Content-Type": "text/plain" }).end("apt cache: the mirror did not answer\n");
      return;
    }
    if (status !== 200) {
      res.writeHead(status === 404 ? 404 : 502, { "Content-Type": "text/plain" }).end(`apt cache: the mirror answered ${status}\n`);
      return;
    }
    const size = statSync(target.file).size;
    res.writeHead(200, { "Content-Length": size, "Content-Type": "application/octet-stream" });
    if (req.method === "HEAD" || size === 0) {
      res.end();
      return;
    }
    const body = createReadStream(target.file, { highWaterMark: 256 * 1024 });
    body.on("data", (b) => (stats.bytesServed += (b as Buffer).length));
    try {
      await (bucket ? pipeline(body, throttle(bucket), res) : pipeline(body, res));
    } catch {
      // apt went away
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
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as AddressInfo).port;
      const url = `http://127.0.0.1:${port}/`;
      resolve({
        url,
        port,
        stats,
        setBucket: (b) => {
          bucket = b;
        },
        aptConf: () => `// cocalc host-testbed benchmark: apt through the local cache (src/apt-cache.ts)\nAcquire::http::Proxy "${url}";\n`,
        close: () =>
          new Promise<void>((r) => {
            server.close(() => r());
            server.closeAllConnections();
          }),
      });
    });
  });
}
