/**
 * A fault-injecting HTTP proxy on 127.0.0.1, put in front of the artifact
 * server or the hub. Requests are forwarded unchanged (method, path, headers,
 * body) to the upstream; per-request rules break some of them on the way:
 *
 * - `status`:   answer with this status (the upstream is not asked);
 * - `reset`:    forward the head and `afterBytes` of the body, then reset the connection (RST)
 *               once the client has received them (an RST discards whatever the sender's kernel
 *               still holds, so resetting at once would deliver less than `afterBytes`);
 * - `truncate`: forward the head (full Content-Length) and `afterBytes`, then close cleanly (FIN);
 * - `corrupt`:  forward everything, every body byte from `fromByte` on inverted (same length);
 * - `stall`:    forward the head and `afterBytes`, then send nothing for `ms` (and go on);
 * - `drop`:     close the connection without an answer (a dead hub, from the client's side);
 * - `rewrite`:  forward the upstream's answer with its body replaced by `transform(body)`
 *               (e.g. a host config with another apt lock timeout).
 *
 * A rule applies to the first `times` requests its `match` accepts (default
 * every one); the first rule that applies wins. `refuseFor(ms)` stops
 * listening for a window, so connections are refused (ECONNREFUSED), then
 * listens again on the same port; a rule `refuseAfter` does that right after
 * a matching request was answered (e.g. once the stub has its config).
 */

import { readFileSync } from "node:fs";
import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo, Socket } from "node:net";

export type FaultKind = "status" | "reset" | "truncate" | "corrupt" | "stall" | "drop" | "rewrite";

export interface FaultRule {
  kind: FaultKind;
  /** Which requests: a path pattern (tested on the path with its query) or a predicate. */
  match?: RegExp | ((req: { method: string; path: string }) => boolean);
  /** Apply to the first `times` matching requests (default: all). */
  times?: number;
  /** status: the status to answer (default 503). */
  status?: number;
  /** reset, truncate, stall: body bytes forwarded first (default 0). */
  afterBytes?: number;
  /** corrupt: first body byte to invert (default 0). */
  fromByte?: number;
  /** stall: how long, ms. */
  ms?: number;
  /** rewrite: the new body from the upstream's. */
  transform?: (body: Buffer) => Buffer | string;
  /** Free text for the log (default the kind). */
  label?: string;
}

export interface ProxyLogEntry {
  method: string;
  path: string;
  /** The request's Range header, if any. */
  range: string | null;
  /** Status sent (0: none, the connection was broken before a head). */
  status: number;
  /** Body bytes sent to the client. */
  bytes: number;
  /** The fault applied, if any. */
  fault: string | null;
  at: number;
}

export interface FaultProxy {
  url: string;
  port: number;
  /** Every request so far, oldest first. */
  log: ProxyLogEntry[];
  /** Add a rule (after the existing ones); returns a function removing it. */
  add(rule: FaultRule): () => void;
  /** Remove every rule and end a refusal window. */
  clear(): Promise<void>;
  /** Where requests go; may be set after start (a hub that needs the proxy's URL first). */
  setUpstream(url: string): void;
  /** Refuse connections (stop listening) for `ms`; resolves when listening again. */
  refuseFor(ms: number): Promise<void>;
  /** Once a request whose path matches has been answered in full, refuse connections for `ms` (once). */
  refuseAfter(match: RegExp, ms: number): void;
  /** Stop listening until `accept()`. */
  refuse(): Promise<void>;
  accept(): Promise<void>;
  /** True while connections are refused. */
  readonly refusing: boolean;
  /** When the current refusal began (ms since the epoch), null while listening. */
  readonly refusingSince: number | null;
  /** How many times each rule fired, by label. */
  fired(label: string): number;
  close(): Promise<void>;
}

interface LiveRule {
  rule: FaultRule;
  left: number;
  fired: number;
}

export interface FaultProxyOptions {
  upstream?: string;
  port?: number;
  /** After a request whose path matches is answered, refuse connections for `ms`. */
  refuseAfter?: { match: RegExp; ms: number };
}

function matches(rule: FaultRule, method: string, path: string): boolean {
  if (!rule.match) return true;
  if (rule.match instanceof RegExp) return rule.match.test(path);
  return rule.match({ method, path });
}

function labelOf(rule: FaultRule): string {
  return rule.label ?? rule.kind;
}

/**
 * Bytes of a 127.0.0.1 connection's send queue the peer has not acknowledged
 * yet (Linux: /proc/net/tcp's tx_queue of the row local:port -> remote:port);
 * null if the connection is not there (closed) or the table is unreadable.
 */
export function unackedBytes(localPort: number, remotePort: number, table = "/proc/net/tcp"): number | null {
  let text: string;
  try {
    text = readFileSync(table, "utf8");
  } catch {
    return null;
  }
  const hexPort = (p: number) => p.toString(16).toUpperCase().padStart(4, "0");
  const local = `:${hexPort(localPort)}`;
  const remote = `:${hexPort(remotePort)}`;
  for (const line of text.split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    // sl local rem st tx_queue:rx_queue ...; 01 = ESTABLISHED
    if (f.length > 4 && f[1]!.endsWith(local) && f[2]!.endsWith(remote) && f[3] === "01") {
      return Number.parseInt(f[4]!.split(":")[0]!, 16);
    }
  }
  return null;
}

/**
 * Resolve once everything written to `sock` has reached the peer: Node's own
 * buffer is flushed to the kernel and the kernel's send queue acknowledged
 * (the client may be slow to read: its window then keeps bytes here). Gives
 * up after `timeoutMs` (a client that stopped reading).
 */
export async function delivered(sock: Socket, timeoutMs = 30_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  while (!sock.destroyed && Date.now() < until) {
    if (sock.writableLength === 0) {
      const left = sock.localPort && sock.remotePort ? unackedBytes(sock.localPort, sock.remotePort) : null;
      if (!left) return;
    }
    await new Promise((r) => setTimeout(r, 5));
  }
}

export async function startFaultProxy(opts: FaultProxyOptions = {}): Promise<FaultProxy> {
  let upstream: URL | null = opts.upstream ? new URL(opts.upstream) : null;
  const rules: LiveRule[] = [];
  const log: ProxyLogEntry[] = [];
  const firedByLabel = new Map<string, number>();
  const sockets = new Set<Socket>();
  const server: Server = createServer();
  let port = opts.port ?? 0;
  let listening = false;
  let refuseTimer: NodeJS.Timeout | null = null;
  let refuseDone: (() => void) | null = null;
  let closed = false;
  let refuseAfter = opts.refuseAfter ?? null;

  server.on("connection", (s: Socket) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });

  function pick(method: string, path: string): LiveRule | null {
    for (const r of rules) {
      if (r.left > 0 && matches(r.rule, method, path)) {
        r.left -= 1;
        r.fired += 1;
        firedByLabel.set(labelOf(r.rule), (firedByLabel.get(labelOf(r.rule)) ?? 0) + 1);
        return r;
      }
    }
    return null;
  }

  function handle(req: IncomingMessage, res: ServerResponse): void {
    const method = req.method ?? "GET";
    const path = req.url ?? "/";
    const live = pick(method, path);
    const rule = live?.rule ?? null;
    const entry: ProxyLogEntry = { method, path, range: req.headers.range ?? null, status: 0, bytes: 0, fault: rule ? labelOf(rule) : null, at: Date.now() };
    log.push(entry);
    const after = () => {
      if (refuseAfter?.match.test(path) && entry.status >= 200 && entry.status < 300) {
        const ms = refuseAfter.ms;
        refuseAfter = null; // once
        void refuseFor(ms);
      }
    };
    res.on("close", after);

    if (rule?.kind === "drop") {
      req.socket.destroy();
      return;
    }
    if (rule?.kind === "status") {
      entry.status = rule.status ?? 503;
      req.resume();
      res.writeHead(entry.status, { "Content-Type": "text/plain", Connection: "close" }).end(`fault: ${labelOf(rule)}\n`);
      return;
    }
    if (!upstream) {
      entry.status = 502;
      res.writeHead(502, { "Content-Type": "text/plain" }).end("fault proxy: no upstream yet\n");
      return;
    }
    const headers = { ...req.headers, host: upstream.host };
    const up = httpRequest(
      { protocol: upstream.protocol, hostname: upstream.hostname, port: upstream.port, method, path, headers },
      // a client that goes away mid-body destroys `up`: the upstream answer then ends in an
      // error ("aborted"), which ends the relay too (never an unhandled rejection)
      (upRes) => void relay(upRes).catch(() => res.destroy()),
    );
    up.on("error", () => {
      if (!res.headersSent) {
        entry.status = 502;
        res.writeHead(502, { "Content-Type": "text/plain" }).end("fault proxy: upstream unreachable\n");
      } else res.destroy();
    });
    res.on("close", () => up.destroy());
    req.pipe(up);

    async function relay(upRes: IncomingMessage): Promise<void> {
      entry.status = upRes.statusCode ?? 502;
      const afterBytes = rule?.afterBytes ?? 0;
      const hasBody = method !== "HEAD" && entry.status !== 204 && entry.status !== 304;
      // stall before the head when nothing of the body comes first
      if (rule?.kind === "stall" && afterBytes === 0) await stall(rule.ms ?? 0);
      if (res.destroyed) {
        upRes.destroy();
        return;
      }
      if (rule?.kind === "rewrite" && rule.transform) {
        const parts: Buffer[] = [];
        for await (const c of upRes) parts.push(c as Buffer);
        const body = Buffer.from(rule.transform(Buffer.concat(parts)));
        const headers = { ...upRes.headers, "content-length": String(body.length) };
        delete headers["transfer-encoding"];
        delete headers.etag;
        res.writeHead(entry.status, upRes.statusMessage, headers);
        entry.bytes = body.length;
        res.end(body);
        return;
      }
      res.writeHead(entry.status, upRes.statusMessage, upRes.headers);
      if (!hasBody) {
        upRes.resume();
        res.end();
        return;
      }
      let sent = 0;
      let stalled = rule?.kind === "stall" && afterBytes === 0;
      for await (const raw of upRes) {
        if (res.destroyed) {
          upRes.destroy();
          return;
        }
        let chunk = raw as Buffer;
        if (rule && (rule.kind === "reset" || rule.kind === "truncate" || (rule.kind === "stall" && !stalled))) {
          const room = afterBytes - sent;
          if (chunk.length >= room) {
            const head = chunk.subarray(0, Math.max(0, room));
            if (head.length) await write(head);
            sent += head.length;
            entry.bytes = sent;
            if (rule.kind === "reset") {
              const sock = res.socket;
              if (sock) await delivered(sock);
              sock?.resetAndDestroy();
              upRes.destroy();
              return;
            }
            if (rule.kind === "truncate") {
              // FIN without the rest: the client sees the body end early
              res.socket?.end();
              res.socket?.destroySoon();
              upRes.destroy();
              return;
            }
            await stall(rule.ms ?? 0);
            stalled = true;
            if (res.destroyed) {
              upRes.destroy();
              return;
            }
            chunk = chunk.subarray(head.length);
            if (!chunk.length) continue;
          }
        }
        if (rule?.kind === "corrupt") {
          const from = rule.fromByte ?? 0;
          const copy = Buffer.from(chunk);
          for (let i = Math.max(0, from - sent); i < copy.length; i++) copy[i] = copy[i]! ^ 0xff;
          chunk = copy;
        }
        await write(chunk);
        sent += chunk.length;
        entry.bytes = sent;
      }
      res.end();
    }

    function write(chunk: Buffer): Promise<void> {
      return new Promise((resolve) => {
        if (res.destroyed) return resolve();
        if (res.write(chunk)) resolve();
        else {
          const done = () => {
            res.off("drain", done);
            res.off("close", done);
            resolve();
          };
          res.on("drain", done);
          res.on("close", done);
        }
      });
    }

    function stall(ms: number): Promise<void> {
      return new Promise((resolve) => {
        const t = setTimeout(done, ms);
        function done() {
          clearTimeout(t);
          res.off("close", done);
          resolve();
        }
        res.on("close", done);
      });
    }
  }

  server.on("request", handle);

  function listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, "127.0.0.1", () => {
        server.off("error", reject);
        port = (server.address() as AddressInfo).port;
        listening = true;
        resolve();
      });
    });
  }

  function unlisten(): Promise<void> {
    if (!listening) return Promise.resolve();
    listening = false;
    return new Promise((resolve) => server.close(() => resolve()));
  }

  let refusedAt: number | null = null;

  async function refuse(): Promise<void> {
    refusedAt ??= Date.now();
    await unlisten();
    // connections already open die too: a dead hub answers nothing
    for (const s of sockets) s.destroy();
  }

  async function accept(): Promise<void> {
    if (refuseTimer) clearTimeout(refuseTimer);
    refuseTimer = null;
    const done = refuseDone;
    refuseDone = null;
    if (!listening && !closed) await listen();
    refusedAt = null;
    done?.();
  }

  function refuseFor(ms: number): Promise<void> {
    return new Promise((resolve) => {
      void refuse().then(() => {
        refuseDone = resolve;
        refuseTimer = setTimeout(() => void accept(), ms);
      });
    });
  }

  await listen();
  const url = `http://127.0.0.1:${port}`;
  return {
    url,
    port,
    log,
    add(rule) {
      const live: LiveRule = { rule, left: rule.times ?? Infinity, fired: 0 };
      rules.push(live);
      return () => {
        const i = rules.indexOf(live);
        if (i >= 0) rules.splice(i, 1);
      };
    },
    async clear() {
      rules.length = 0;
      refuseAfter = null;
      await accept();
    },
    setUpstream(u) {
      upstream = new URL(u);
    },
    refuseFor,
    refuseAfter(match, ms) {
      refuseAfter = { match, ms };
    },
    refuse,
    accept,
    get refusing() {
      return !listening;
    },
    get refusingSince() {
      return listening ? null : refusedAt;
    },
    fired(label) {
      return firedByLabel.get(label) ?? 0;
    },
    async close() {
      closed = true;
      if (refuseTimer) clearTimeout(refuseTimer);
      refuseDone?.();
      for (const s of sockets) s.destroy();
      await unlisten();
    },
  };
}
