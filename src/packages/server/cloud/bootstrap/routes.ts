/**
 * The bootstrap routes, as one Express router mountable under any prefix P:
 *
 *   GET  P/bootstrap.py                  bootstrap.py, byte for byte (X-Bootstrap-Sha256)
 *   GET  P/hosts/:id/bootstrap.py        the same bytes (the stub's baseUrl is P/hosts/:id)
 *   GET  P/hosts/:id/config              the host's config                 (Bearer token)
 *   GET  P/hosts/:id/secrets/:name       one secret, text/plain            (Bearer token)
 *   POST P/hosts/:id/events              a batch of progress events        (Bearer token)
 *   GET  P/hosts/:id/status              the status model (JSON)
 *   GET  P/hosts/:id/stream              server-sent events: `status` on every change
 *   GET  P/hosts/:id/                    the progress page
 *
 * Status, stream and page carry no token: the hub mounts them behind its own
 * login, or passes `authorizeViewer`.
 */
import {
  bootstrapPyBytes,
  bootstrapPySha256,
  EventBatchSchema,
  MAX_BATCH_BYTES,
  SECRET_NAME_RE,
  UUID_RE,
} from "@cocalc/project-host-bootstrap";
import express, { type Request, type Response, type Router } from "express";
import { z } from "zod";
import type { Db } from "./db.js";
import { badRequest, errorHandler, HttpError } from "./http-errors.js";
import { HostChangeFeed } from "./live.js";
import { withCallerAddress } from "./hosts.js";
import { progressPageHtml, progressPageScript } from "./page.js";
import { DEFAULT_STALE_AFTER_S, hostStatus, statusFingerprint } from "./status.js";
import { getHost, getSecret, insertEvents, listRuns } from "./store.js";
import { bearerToken, verifyToken } from "./tokens.js";

export interface BootstrapRouterDeps {
  db: Db;
  /** Silence after which a running bootstrap shows as stale (default 120 s). */
  staleAfterS?: number;
  /** Largest accepted events body (default the event schema's MAX_BATCH_BYTES). */
  maxBatchBytes?: number;
  /** How often an open stream re-derives the status even without a notification. */
  streamRecheckMs?: number;
  heartbeatMs?: number;
  now?: () => Date;
  /** Who may see status, stream and page (default: anyone who reaches the router). */
  authorizeViewer?: (req: Request, hostId: string) => boolean | Promise<boolean>;
  /** bootstrap.py as served (default: the packaged asset). */
  bootstrapPy?: { bytes: Buffer; sha256: string };
  logError?: (message: string, error: unknown) => void;
}

export interface BootstrapRouter extends Router {
  /** Stop listening for changes and end open streams. */
  closeBootstrap(): Promise<void>;
}

const HostIdSchema = z.string().regex(UUID_RE, { message: "must be a lowercase UUID" });
const SecretNameSchema = z.string().regex(SECRET_NAME_RE, { message: "must match " + SECRET_NAME_RE.source });

function param(req: Request, name: string): string {
  const v = (req.params as Record<string, unknown>)[name];
  return typeof v === "string" ? v : "";
}

function hostIdOf(req: Request): string {
  const r = HostIdSchema.safeParse(param(req, "id"));
  if (!r.success) throw badRequest("host id", r.error);
  return r.data;
}

const defaultLogError = (message: string, error: unknown) => console.error(`bootstrap: ${message}:`, error);

export function createBootstrapRouter(deps: BootstrapRouterDeps): BootstrapRouter {
  const db = deps.db;
  const now = deps.now ?? (() => new Date());
  const staleAfterS = deps.staleAfterS ?? DEFAULT_STALE_AFTER_S;
  const maxBatchBytes = deps.maxBatchBytes ?? MAX_BATCH_BYTES;
  const recheckMs = deps.streamRecheckMs ?? 5000;
  const heartbeatMs = deps.heartbeatMs ?? 15000;
  const logError = deps.logError ?? defaultLogError;
  const feed = new HostChangeFeed(db);
  const openStreams = new Set<Response>();
  let bootstrapPy = deps.bootstrapPy;
  const router = express.Router() as BootstrapRouter;

  async function requireToken(req: Request, hostId: string): Promise<void> {
    const verdict = await verifyToken(db, hostId, bearerToken(req.get("authorization")), now());
    if (verdict.ok) return;
    const challenge = { "WWW-Authenticate": 'Bearer realm="cocalc-bootstrap"' };
    throw new HttpError(verdict.status, verdict.status === 403 ? "token belongs to another host" : `bootstrap token ${verdict.reason}`, verdict.status === 401 ? challenge : {});
  }

  async function requireViewer(req: Request, hostId: string): Promise<void> {
    if (deps.authorizeViewer && !(await deps.authorizeViewer(req, hostId))) throw new HttpError(403, "not allowed to view this host");
  }

  async function requireKnownHost(hostId: string): Promise<void> {
    if ((await getHost(db, hostId)) === null && (await listRuns(db, hostId)).length === 0) throw new HttpError(404, "unknown host");
  }

  function sendBootstrapPy(_req: Request, res: Response): void {
    bootstrapPy ??= { bytes: bootstrapPyBytes(), sha256: bootstrapPySha256() };
    res
      .status(200)
      .set({ "Content-Type": "text/x-python; charset=utf-8", "X-Bootstrap-Sha256": bootstrapPy.sha256, "Cache-Control": "no-cache" })
      .send(bootstrapPy.bytes);
  }

  router.get("/bootstrap.py", sendBootstrapPy);
  router.get("/hosts/:id/bootstrap.py", (req, res) => {
    hostIdOf(req);
    sendBootstrapPy(req, res);
  });

  router.get("/hosts/:id/config", async (req, res) => {
    const hostId = hostIdOf(req);
    await requireToken(req, hostId);
    const host = await getHost(db, hostId);
    if (!host) throw new HttpError(404, "no config for this host");
    res.set("Cache-Control", "no-store").json(withCallerAddress(host.config, req.ip ?? req.socket.remoteAddress));
  });

  router.get("/hosts/:id/secrets/:name", async (req, res) => {
    const hostId = hostIdOf(req);
    const name = SecretNameSchema.safeParse(param(req, "name"));
    if (!name.success) throw badRequest("secret name", name.error);
    await requireToken(req, hostId);
    const value = await getSecret(db, hostId, name.data);
    if (value === null) throw new HttpError(404, `no secret ${name.data} for this host`);
    res.status(200).set({ "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store" }).send(value);
  });

  // The token is checked before the body is read: strangers cannot make us parse a megabyte.
  router.post(
    "/hosts/:id/events",
    async (req, _res, next) => {
      await requireToken(req, hostIdOf(req));
      next();
    },
    express.json({ limit: maxBatchBytes, strict: true, type: () => true }),
    async (req, res) => {
      const hostId = hostIdOf(req);
      const batch = EventBatchSchema.safeParse(req.body);
      if (!batch.success) throw badRequest("event batch", batch.error);
      if (batch.data.host_id !== hostId) throw new HttpError(400, "invalid event batch: host_id does not match the URL");
      const stored = await insertEvents(db, hostId, batch.data.events, now());
      res.status(200).json({ stored, duplicates: batch.data.events.length - stored });
    },
  );

  router.get("/hosts/:id/status", async (req, res) => {
    const hostId = hostIdOf(req);
    await requireViewer(req, hostId);
    await requireKnownHost(hostId);
    res.set("Cache-Control", "no-store").json(await hostStatus(db, hostId, { now: now(), staleAfterS }));
  });

  router.get("/hosts/:id/stream", async (req, res) => {
    const hostId = hostIdOf(req);
    await requireViewer(req, hostId);
    await requireKnownHost(hostId);
    await streamStatus(req, res, hostId);
  });

  async function streamStatus(req: Request, res: Response, hostId: string): Promise<void> {
    res.writeHead(200, {
      "Content-Type": "text/event-stream; charset=utf-8",
      "Cache-Control": "no-store",
      Connection: "keep-alive",
      "X-Accel-Buffering": "no", // nginx: do not buffer the stream
    });
    res.write("retry: 2000\n\n");
    let last = "";
    let busy = false;
    let again = false;
    let closed = false;
    // Coalesce bursts of notifications into one derivation at a time.
    const push = async (): Promise<void> => {
      if (busy) {
        again = true;
        return;
      }
      busy = true;
      try {
        do {
          again = false;
          const status = await hostStatus(db, hostId, { now: now(), staleAfterS });
          const fp = statusFingerprint(status);
          if (!closed && fp !== last) {
            last = fp;
            res.write(`event: status\ndata: ${JSON.stringify(status)}\n\n`);
          }
        } while (again && !closed);
      } catch (err) {
        logError(`stream for host ${hostId}`, err);
      } finally {
        busy = false;
      }
    };
    const unsubscribe = await feed.subscribe(hostId, () => void push());
    const recheck = setInterval(() => void push(), recheckMs);
    const heartbeat = setInterval(() => res.write(": ping\n\n"), heartbeatMs);
    openStreams.add(res);
    const stop = () => {
      closed = true;
      unsubscribe();
      clearInterval(recheck);
      clearInterval(heartbeat);
      openStreams.delete(res);
    };
    req.on("close", stop);
    res.on("close", stop);
    await push();
  }

  router.get("/hosts/:id/progress-page.js", async (req, res) => {
    hostIdOf(req);
    const js = await progressPageScript();
    res.status(200).set({ "Content-Type": "text/javascript; charset=utf-8", "Cache-Control": "no-cache" }).send(js);
  });

  router.get("/hosts/:id", async (req, res) => {
    const hostId = hostIdOf(req);
    // Relative links (status, stream, script) need the trailing slash.
    const [path, query] = req.originalUrl.split("?", 2) as [string, string | undefined];
    if (!path.endsWith("/")) {
      res.redirect(301, `${path}/${query === undefined ? "" : `?${query}`}`);
      return;
    }
    await requireViewer(req, hostId);
    res.status(200).set({ "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache" }).send(progressPageHtml(hostId));
  });

  router.use((req, _res, next) => next(new HttpError(404, `no route for ${req.method} ${req.path}`)));
  router.use(errorHandler({ maxBodyBytes: maxBatchBytes, logError }));

  router.closeBootstrap = async () => {
    for (const res of openStreams) res.end();
    openStreams.clear();
    await feed.close();
  };
  return router;
}
