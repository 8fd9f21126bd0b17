/**
 * The bootstrap routes, as one Express router mountable under any prefix P:
 *
 *   GET  P/bootstrap.py                  bootstrap.py, byte for byte (X-Bootstrap-Sha256)
 *   GET  P/hosts/:id/bootstrap.py        the same bytes (the stub's baseUrl is P/hosts/:id)
 *   POST P/hosts/:id/credential          token (+ sha256 of the host-chosen credential) → exchanged; credential → rotated one (credentials.ts)
 *   GET  P/hosts/:id/bootstrap.py.sha256 the sha256 of bootstrap.py as served    (Bearer credential)
 *   GET  P/hosts/:id/config              the host's config                 (Bearer credential)
 *   GET  P/hosts/:id/secrets/:name       one secret, text/plain            (Bearer credential)
 *   POST P/hosts/:id/events              a batch of progress events        (Bearer credential)
 *   GET  P/hosts/:id/status              the status model (JSON)
 *   GET  P/hosts/:id/credentials         the host's tokens, credentials and their log (JSON, no secrets)
 *   GET  P/hosts/:id/stream              server-sent events: `status` on every change (stream.ts)
 *   GET  P/hosts/:id/                    the progress page (+ progress-page.js, progress-page.css)
 *   GET  P/fleet/status                  every host's latest run + step durations (fleet.ts)
 *   GET  P/fleet/                        the fleet page (+ fleet-page.js, fleet-page.css)
 *
 * "Bearer credential": the host's credential, or its bootstrap token until
 * that is exchanged (refused everywhere after; see credentials.ts).
 * Status, stream and page (a host's and the fleet's) carry no token and are
 * closed by default: the hub passes `authorizeViewer` (a host) and
 * `authorizeFleetViewer` (the fleet); without one, only loopback callers
 * are let in (the demo). An authorizer that throws refuses (403), logged.
 */
import { bootstrapPyBytes, bootstrapPySha256, EventBatchSchema, MAX_BATCH_BYTES } from "@cocalc/project-host-bootstrap";
import { SECRET_NAME_RE, UUID_RE } from "@cocalc/project-host-bootstrap/contract";
import express, { type NextFunction, type Request, type Response, type Router } from "express";
import { z } from "zod/v4";
import {
  authorizeHost,
  CREDENTIAL_RE,
  CREDENTIAL_SHA256_RE,
  type CredentialPolicy,
  exchangeOrRotate,
  type HostAuthVerdict,
  hostCredentialRecord,
} from "./credentials.js";
import type { Db } from "./db.js";
import { FleetQuerySchema, fleetView } from "./fleet.js";
import { type BootstrapStatusAdapter, HostRecordReporter } from "./host-records.js";
import { withCallerAddress } from "./hosts.js";
import { badRequest, errorHandler, HttpError, invalidContent, notFound } from "./http-errors.js";
import { fleetPageHtml, fleetPageScript, fleetPageStyle, PageNotBuiltError, progressPageHtml, progressPageScript, progressPageStyle } from "./page.js";
import { DEFAULT_STALE_AFTER_S, hostStatus } from "./status.js";
import { EventConflictError, getHost, getSecret, hasEvents, insertEvents } from "./store.js";
import { StatusStreams } from "./stream.js";
import { bearerToken } from "./tokens.js";

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
  /**
   * Who may see a host's status, stream and page. Without it, only callers on
   * a loopback address (the socket's, never a forwarded header). A throw refuses.
   */
  authorizeViewer?: (req: Request, hostId: string) => boolean | Promise<boolean>;
  /** When host credentials are due for rotation, and the grace of a rotated one. */
  credentialPolicy?: CredentialPolicy;
  /** Who may see the fleet page and its JSON (every host). Without it, loopback only. A throw refuses. */
  authorizeFleetViewer?: (req: Request) => boolean | Promise<boolean>;
  /** The hub's host records (upstream's metadata.bootstrap): told of every status change (host-records.ts). */
  statusAdapter?: BootstrapStatusAdapter;
  /** How often undelivered host-record statuses are retried (default 10 s; 0: only on the host's next batch). */
  hostRecordsSweepMs?: number;
  /** An adapter call that takes longer counts as failed (default 10 s). */
  hostRecordsTimeoutMs?: number;
  /** First retry delay after a refused delivery; doubles up to 5 min (default 5 s). */
  hostRecordsRetryBaseMs?: number;
  /** bootstrap.py as served (default: the packaged asset). */
  bootstrapPy?: { bytes: Buffer; sha256: string };
  logError?: (message: string, error: unknown) => void;
}

/** The router and what stops it: `close()` ends open streams and stops listening for changes. */
export interface BootstrapRouter {
  router: Router;
  close(): Promise<void>;
  /** The status streams (open viewers, derivations so far). */
  streams: StatusStreams;
  /** The host-record reporter, when a statusAdapter was given. */
  hostRecords: HostRecordReporter | null;
}

const LOOPBACK = new Set(["127.0.0.1", "::1", "::ffff:127.0.0.1"]);

/** The caller's own address is loopback (the socket's: X-Forwarded-For is not looked at). */
export function isLoopback(req: Request): boolean {
  return LOOPBACK.has(req.socket.remoteAddress ?? "");
}

const HostIdSchema = z.string().regex(UUID_RE, { message: "must be a lowercase UUID" });
const SecretNameSchema = z.string().regex(SECRET_NAME_RE, { message: `must match ${SECRET_NAME_RE.source}` });

function param(req: Request, name: string): string {
  const v = (req.params as Record<string, unknown>)[name];
  return typeof v === "string" ? v : "";
}

function hostIdOf(req: Request): string {
  const r = HostIdSchema.safeParse(param(req, "id"));
  if (!r.success) throw badRequest("host id", r.error);
  return r.data;
}

/** PostgreSQL (and PGlite) error class 22, "data exception": a value the database cannot store. */
function isDataException(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && code.startsWith("22");
}

/** The exchange's body: empty, or `{"credential_sha256": …}` (a few hundred bytes at most). */
export const EXCHANGE_BODY_MAX_BYTES = 1024;
const ExchangeBodySchema = z
  .object(
    {
      credential_sha256: z
        .string({ message: "must be a string: the sha256 of the host-chosen credential" })
        .regex(CREDENTIAL_SHA256_RE, { message: "must be the sha256 of the host-chosen credential: 64 lowercase hex characters" })
        .optional(),
    },
    { error: (issue) => (issue.code === "invalid_type" ? 'must be a JSON object: {"credential_sha256": "<64 lowercase hex>"}' : undefined) },
  )
  .strict();
const EXCHANGE_BODY_HINT = `send no body, or {"credential_sha256": "<64 lowercase hex>"} (at most ${EXCHANGE_BODY_MAX_BYTES} bytes)`;

const rawExchangeBody = express.raw({ limit: EXCHANGE_BODY_MAX_BYTES, type: () => true });

/** The raw body, with this route's own clear 400s (too large, aborted, bad encoding): nothing is looked at before. */
function exchangeBodyParser(req: Request, res: Response, next: NextFunction): void {
  rawExchangeBody(req, res, (err?: unknown) => {
    if (!err) return next();
    const type = (err as { type?: unknown } | null)?.type;
    const why = type === "entity.too.large" ? "too large" : type === "request.aborted" ? "aborted" : "unreadable";
    next(new HttpError(400, `invalid credential request: the request body is ${why}; ${EXCHANGE_BODY_HINT}`));
  });
}

function exchangeBody(raw: unknown): z.infer<typeof ExchangeBodySchema> {
  if (!Buffer.isBuffer(raw) || raw.length === 0) return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(raw.toString("utf8"));
  } catch {
    throw new HttpError(400, `invalid credential request: the request body is not JSON; ${EXCHANGE_BODY_HINT}`);
  }
  const body = ExchangeBodySchema.safeParse(parsed);
  if (!body.success) throw badRequest("credential request", body.error);
  return body.data;
}

const defaultLogError = (message: string, error: unknown) => console.error(`bootstrap: ${message}:`, error);

export function createBootstrapRouter(deps: BootstrapRouterDeps): BootstrapRouter {
  const db = deps.db;
  const now = deps.now ?? (() => new Date());
  const staleAfterS = deps.staleAfterS ?? DEFAULT_STALE_AFTER_S;
  const maxBatchBytes = deps.maxBatchBytes ?? MAX_BATCH_BYTES;
  const logError = deps.logError ?? defaultLogError;
  const streams = new StatusStreams({
    db,
    now,
    staleAfterS,
    recheckMs: deps.streamRecheckMs ?? 5000,
    heartbeatMs: deps.heartbeatMs ?? 15000,
    logError,
  });
  let bootstrapPy = deps.bootstrapPy;
  const hostRecords = deps.statusAdapter
    ? new HostRecordReporter({
        db,
        adapter: deps.statusAdapter,
        now,
        staleAfterS,
        logError,
        sweepMs: deps.hostRecordsSweepMs,
        timeoutMs: deps.hostRecordsTimeoutMs,
        retryBaseMs: deps.hostRecordsRetryBaseMs,
      })
    : null;

  const callerAddress = (req: Request) => req.ip ?? req.socket.remoteAddress ?? null;

  function refused(verdict: HostAuthVerdict & { ok: false }): HttpError {
    const challenge = { "WWW-Authenticate": 'Bearer realm="cocalc-bootstrap"' };
    return new HttpError(verdict.status, verdict.message, verdict.status === 401 ? challenge : {}, verdict.code);
  }

  /** The host's credential (or its never-exchanged bootstrap token). */
  async function requireHost(req: Request, hostId: string): Promise<void> {
    const verdict = await authorizeHost(db, hostId, bearerToken(req.get("authorization")), { now: now(), address: callerAddress(req) });
    if (!verdict.ok) throw refused(verdict);
  }

  /** Ask an authorizer; a throw or anything but `true` refuses (the throw is logged, never shown). */
  async function allowed(what: string, ask: () => boolean | Promise<boolean>): Promise<boolean> {
    try {
      return (await ask()) === true;
    } catch (err) {
      logError(`${what} threw; refused`, err);
      return false;
    }
  }

  async function requireViewer(req: Request, hostId: string): Promise<void> {
    const authorize = deps.authorizeViewer;
    const ok = authorize ? await allowed("authorizeViewer", () => authorize(req, hostId)) : isLoopback(req);
    if (!ok) throw new HttpError(403, "not allowed to view this host");
  }

  async function requireFleetViewer(req: Request): Promise<void> {
    const authorize = deps.authorizeFleetViewer;
    const ok = authorize ? await allowed("authorizeFleetViewer", () => authorize(req)) : isLoopback(req);
    if (!ok) throw new HttpError(403, "not allowed to view the fleet");
  }

  async function requireKnownHost(hostId: string): Promise<void> {
    if ((await getHost(db, hostId)) === null && !(await hasEvents(db, hostId))) throw new HttpError(404, "unknown host");
  }

  // --- the handlers, one per route ---------------------------------------------------

  function sendBootstrapPy(_req: Request, res: Response): void {
    bootstrapPy ??= { bytes: bootstrapPyBytes(), sha256: bootstrapPySha256() };
    res
      .status(200)
      .set({ "Content-Type": "text/x-python; charset=utf-8", "X-Bootstrap-Sha256": bootstrapPy.sha256, "Cache-Control": "no-cache" })
      .send(bootstrapPy.bytes);
  }

  function sendHostBootstrapPy(req: Request, res: Response): void {
    hostIdOf(req);
    sendBootstrapPy(req, res);
  }

  /**
   * Exchange (token) or rotate (credential). The body is empty (a stub of the
   * previous version, and rotation) or `{"credential_sha256": "<64 hex>"}`,
   * the sha256 of the credential the host chose, with a token only; anything
   * else is a 400 naming the field, before anything is looked at.
   * Answers: 201 `{credential: null, credential_sha256, rotate_after}` when
   * the token was exchanged for the host-chosen credential now, 200 with the
   * same when it was before (a retry after a lost answer); 201
   * `{credential, rotate_after}` with a hub-made credential (no
   * credential_sha256 sent, or rotation due); 200 with `credential: null`
   * when the presented credential is not due; 401/403/409 `{error, code}`
   * otherwise (a replayed token: `token_already_exchanged`, recorded for the
   * operator).
   */
  async function exchangeCredential(req: Request, res: Response): Promise<void> {
    const hostId = hostIdOf(req);
    const body = exchangeBody(req.body);
    const bearer = bearerToken(req.get("authorization"));
    if (body.credential_sha256 !== undefined && bearer && CREDENTIAL_RE.test(bearer)) {
      throw new HttpError(400, "invalid credential request: credential_sha256: only with a bootstrap token (rotation takes no body)");
    }
    const r = await exchangeOrRotate(db, hostId, bearer, {
      now: now(),
      address: callerAddress(req),
      chosenSha256: body.credential_sha256 ?? null,
      ...deps.credentialPolicy,
    });
    if (!r.ok) throw refused(r);
    const { chosen } = r.grant;
    res
      .status(chosen ? (chosen.outcome === "new" ? 201 : 200) : r.grant.credential ? 201 : 200)
      .set("Cache-Control", "no-store")
      .json({
        credential: r.grant.credential,
        ...(chosen ? { credential_sha256: chosen.sha256, exchange: chosen.outcome } : {}),
        rotate_after: r.grant.rotateAfter.toISOString(),
      });
  }

  /** bootstrap.py's sha256 over the host's authenticated channel: the stub takes a newer bootstrap.py only with it. */
  async function sendBootstrapPySha(req: Request, res: Response): Promise<void> {
    const hostId = hostIdOf(req);
    await requireHost(req, hostId);
    bootstrapPy ??= { bytes: bootstrapPyBytes(), sha256: bootstrapPySha256() };
    res.status(200).set({ "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store" }).send(`${bootstrapPy.sha256}\n`);
  }

  async function sendCredentialRecord(req: Request, res: Response): Promise<void> {
    const hostId = hostIdOf(req);
    await requireViewer(req, hostId);
    await requireKnownHost(hostId);
    res.set("Cache-Control", "no-store").json(await hostCredentialRecord(db, hostId));
  }

  async function sendConfig(req: Request, res: Response): Promise<void> {
    const hostId = hostIdOf(req);
    await requireHost(req, hostId);
    const host = await getHost(db, hostId);
    if (!host) throw new HttpError(404, "no config for this host");
    res.set("Cache-Control", "no-store").json(withCallerAddress(host.config, req.ip ?? req.socket.remoteAddress));
  }

  async function sendSecret(req: Request, res: Response): Promise<void> {
    const hostId = hostIdOf(req);
    const name = SecretNameSchema.safeParse(param(req, "name"));
    if (!name.success) throw badRequest("secret name", name.error);
    await requireHost(req, hostId);
    const value = await getSecret(db, hostId, name.data);
    if (value === null) throw new HttpError(404, `no secret ${name.data} for this host`);
    res.status(200).set({ "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store" }).send(value);
  }

  // The token is checked before the body is read: strangers cannot make us parse a megabyte.
  async function authorizeEvents(req: Request, _res: Response, next: NextFunction): Promise<void> {
    await requireHost(req, hostIdOf(req));
    next();
  }

  /**
   * Store a batch. Answers: 200 `{stored, duplicates}`; 422 for a batch
   * that is valid JSON but not a valid batch (naming the field) or that holds
   * a value the database cannot store; 409 when it repeats a stored (run, seq)
   * with different content. Either refusal stores nothing.
   */
  async function storeEvents(req: Request, res: Response): Promise<void> {
    const hostId = hostIdOf(req);
    const batch = EventBatchSchema.safeParse(req.body);
    if (!batch.success) throw invalidContent("event batch", batch.error);
    if (batch.data.host_id !== hostId) throw new HttpError(422, "invalid event batch: host_id: does not match the URL");
    let stored: number;
    try {
      stored = await insertEvents(db, hostId, batch.data.events, now());
    } catch (err) {
      if (err instanceof EventConflictError) throw new HttpError(409, err.message);
      if (isDataException(err)) {
        logError(`events for host ${hostId} refused by the database`, err);
        throw new HttpError(422, "invalid event batch: it holds a value the database cannot store");
      }
      throw err;
    }
    // Stored and acknowledged first: the host records hear of it in the background, and a
    // failing adapter is retried by the hub (host-records.ts), never by making the host resend.
    if (stored > 0) hostRecords?.changed(hostId);
    res.status(200).json({ stored, duplicates: batch.data.events.length - stored });
  }

  async function sendStatus(req: Request, res: Response): Promise<void> {
    const hostId = hostIdOf(req);
    await requireViewer(req, hostId);
    await requireKnownHost(hostId);
    res.set("Cache-Control", "no-store").json(await hostStatus(db, hostId, { now: now(), staleAfterS }));
  }

  async function sendStream(req: Request, res: Response): Promise<void> {
    const hostId = hostIdOf(req);
    await requireViewer(req, hostId);
    await requireKnownHost(hostId);
    await streams.serve(req, res, hostId);
  }

  async function sendScript(res: Response, read: () => Promise<Buffer>): Promise<void> {
    let js: Buffer;
    try {
      js = await read();
    } catch (err) {
      if (!(err instanceof PageNotBuiltError)) throw err;
      logError("progress page", err);
      throw new HttpError(503, "the progress page is not built on this hub");
    }
    res.status(200).set({ "Content-Type": "text/javascript; charset=utf-8", "Cache-Control": "no-cache" }).send(js);
  }

  async function sendStyle(res: Response, read: () => Promise<Buffer>): Promise<void> {
    const css = await read();
    res.status(200).set({ "Content-Type": "text/css; charset=utf-8", "Cache-Control": "no-cache" }).send(css);
  }

  async function sendPageScript(req: Request, res: Response): Promise<void> {
    hostIdOf(req);
    await sendScript(res, progressPageScript);
  }

  async function sendPageStyle(req: Request, res: Response): Promise<void> {
    hostIdOf(req);
    await sendStyle(res, progressPageStyle);
  }

  /** Relative links need the trailing slash: false when it redirected. */
  function withTrailingSlash(req: Request, res: Response): boolean {
    const [path, query] = req.originalUrl.split("?", 2) as [string, string | undefined];
    if (path.endsWith("/")) return true;
    res.redirect(301, `${path}/${query === undefined ? "" : `?${query}`}`);
    return false;
  }

  async function sendPage(req: Request, res: Response): Promise<void> {
    const hostId = hostIdOf(req);
    // Relative links (status, stream, script, style) need the trailing slash.
    if (!withTrailingSlash(req, res)) return;
    await requireViewer(req, hostId);
    res.status(200).set({ "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache" }).send(progressPageHtml(hostId));
  }

  function fleetQuery(req: Request) {
    const q = FleetQuerySchema.safeParse({ ...(req.query as Record<string, unknown>) });
    if (!q.success) throw badRequest("fleet query", q.error);
    return q.data;
  }

  async function sendFleetStatus(req: Request, res: Response): Promise<void> {
    await requireFleetViewer(req);
    const q = fleetQuery(req);
    res.set("Cache-Control", "no-store").json(await fleetView(db, { now: now(), staleAfterS, windowS: q.window_s, limit: q.limit }));
  }

  async function sendFleetPage(req: Request, res: Response): Promise<void> {
    if (!withTrailingSlash(req, res)) return;
    await requireFleetViewer(req);
    fleetQuery(req); // the page passes its query string on to fleet/status: refuse a bad one here already
    res.status(200).set({ "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache" }).send(fleetPageHtml());
  }

  const router = express.Router();
  router.get("/bootstrap.py", sendBootstrapPy);
  router.get("/hosts/:id/bootstrap.py", sendHostBootstrapPy);
  router.post("/hosts/:id/credential", exchangeBodyParser, exchangeCredential);
  router.get("/hosts/:id/bootstrap.py.sha256", sendBootstrapPySha);
  router.get("/hosts/:id/credentials", sendCredentialRecord);
  router.get("/hosts/:id/config", sendConfig);
  router.get("/hosts/:id/secrets/:name", sendSecret);
  router.post("/hosts/:id/events", authorizeEvents, express.json({ limit: maxBatchBytes, strict: true, type: () => true }), storeEvents);
  router.get("/hosts/:id/status", sendStatus);
  router.get("/hosts/:id/stream", sendStream);
  router.get("/hosts/:id/progress-page.js", sendPageScript);
  router.get("/hosts/:id/progress-page.css", sendPageStyle);
  router.get("/hosts/:id", sendPage);
  router.get("/fleet/status", sendFleetStatus);
  router.get("/fleet/fleet-page.js", (_req, res) => sendScript(res, fleetPageScript));
  router.get("/fleet/fleet-page.css", (_req, res) => sendStyle(res, fleetPageStyle));
  router.get("/fleet", sendFleetPage);
  router.use(notFound);
  router.use(errorHandler({ maxBodyBytes: maxBatchBytes, logError }));

  return {
    router,
    streams,
    hostRecords,
    async close() {
      await streams.close();
      await hostRecords?.close();
    },
  };
}
