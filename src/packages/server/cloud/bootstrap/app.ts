/**
 * The hub side as an Express app: the bootstrap router under a prefix, plus
 * an optional localhost-only admin route to provision hosts (demo and e2e).
 * Never listens; `startHub()` in hub.ts does.
 */

import { UUID_RE } from "@cocalc/project-host-bootstrap/contract";
import express, { type Express, type Request } from "express";
import { z } from "zod/v4";
import type { Db } from "./db.js";
import type { HostRecordReporter } from "./host-records.js";
import { type HostRecordInput, type ProvisionedHost, ProvisionRefusedError, provisionHost, type SiteSettingsInput } from "./hosts.js";
import { badRequest, errorHandler, HttpError, notFound } from "./http-errors.js";
import { hostLifecycle, type LifecycleEvent, type RevokeHostCredentials } from "./lifecycle.js";
import { ManifestFetcher } from "./manifests.js";
import { type BootstrapRouter, type BootstrapRouterDeps, createBootstrapRouter } from "./routes.js";
import { getHost } from "./store.js";

export const DEFAULT_PREFIX = "/bootstrap";

export interface CreateAppOptions extends Omit<BootstrapRouterDeps, "db"> {
  db: Db;
  /** Site settings, or a function giving them (e.g. once the port is known). */
  settings: SiteSettingsInput | (() => SiteSettingsInput);
  /** Where the router is mounted (default `/bootstrap`). */
  prefix?: string;
  manifests?: ManifestFetcher;
  tokenTtlMs?: number;
  /**
   * Mount `POST /admin/hosts` (accepted from loopback addresses only; off by
   * default). It refuses to replace a host that already exists unless the
   * request says `"replace": true`.
   */
  enableAdmin?: boolean;
  /** How the admin lifecycle routes revoke a host's credentials (default: lifecycle.ts's call point). */
  revokeHostCredentials?: RevokeHostCredentials;
}

export interface HubApp {
  app: Express;
  provisionHost(record: HostRecordInput, opts?: { secrets?: Record<string, string> }): Promise<ProvisionedHost>;
  /** The host-record reporter, when a statusAdapter was given. */
  hostRecords: HostRecordReporter | null;
  /** The status streams (viewers, derivations, writes). */
  streams: BootstrapRouter["streams"];
  close(): Promise<void>;
}

const LIFECYCLE_EVENTS = new Set<string>(["stop", "delete", "deprovision"]);
const LOOPBACK = new Set(["127.0.0.1", "::1", "::ffff:127.0.0.1"]);

const ProvisionRequestSchema = z.strictObject({
  record: z.record(z.string(), z.unknown()),
  secrets: z.record(z.string(), z.string()).optional(),
  /** Re-provision a host that exists: new config and secrets, its older tokens revoked. */
  replace: z.boolean().default(false),
});

function requireLoopback(req: Request): void {
  if (!LOOPBACK.has(req.socket.remoteAddress ?? "")) throw new HttpError(403, "admin routes answer on loopback only");
}

export function createApp(opts: CreateAppOptions): HubApp {
  const prefix = opts.prefix ?? DEFAULT_PREFIX;
  const manifests = opts.manifests ?? new ManifestFetcher();
  const settings = () => (typeof opts.settings === "function" ? opts.settings() : opts.settings);
  const bootstrap = createBootstrapRouter(opts);
  const app = express();
  app.disable("x-powered-by");
  app.set("trust proxy", false);
  app.use(prefix, bootstrap.router);

  const provision: HubApp["provisionHost"] = (record, o = {}) =>
    provisionHost({ db: opts.db, settings: settings(), manifests, tokenTtlMs: opts.tokenTtlMs, statusAdapter: opts.statusAdapter }, record, o);

  if (opts.enableAdmin) {
    app.post("/admin/hosts", express.json({ limit: 64 * 1024 }), async (req, res) => {
      requireLoopback(req);
      const body = ProvisionRequestSchema.safeParse(req.body);
      if (!body.success) throw badRequest("provision request", body.error);
      const id = body.data.record.id;
      if (!body.data.replace && typeof id === "string" && (await getHost(opts.db, id)) !== null) {
        throw new HttpError(409, `host ${id} already exists; send "replace": true to re-provision it (its tokens are revoked)`);
      }
      let host: ProvisionedHost;
      try {
        host = await provision(body.data.record as HostRecordInput, { secrets: body.data.secrets ?? {} });
      } catch (err) {
        // Refusals (bad record, bad manifest) are the operator's to read; anything else is internal (500, logged).
        if (err instanceof ProvisionRefusedError) throw new HttpError(400, err.message);
        throw err;
      }
      res
        .status(201)
        .set("Cache-Control", "no-store")
        .json({
          host_id: host.hostId,
          base_url: host.baseUrl,
          page_url: `${host.baseUrl}/`,
          token: host.token,
          expires_at: host.expiresAt.toISOString(),
          stub: host.stub,
          config: host.config,
        });
    });
  }
  if (opts.enableAdmin) {
    // The hub's lifecycle, for the demo and the tests: stop, delete, deprovision revoke the host's credentials.
    app.post("/admin/hosts/:id/:event", async (req, res) => {
      requireLoopback(req);
      const id = String(req.params.id);
      const event = String(req.params.event);
      if (!UUID_RE.test(id)) throw new HttpError(400, "invalid host id: must be a lowercase UUID");
      if (!LIFECYCLE_EVENTS.has(event)) throw new HttpError(404, `no such lifecycle event: use ${[...LIFECYCLE_EVENTS].join(", ")}`);
      const done = await hostLifecycle({ db: opts.db, revoke: opts.revokeHostCredentials }, id, event as LifecycleEvent);
      if (done === null) throw new HttpError(404, `host ${id} is not known`);
      res.set("Cache-Control", "no-store").json({ host_id: id, event, revoked: done.revoked, secrets_deleted: done.secretsDeleted });
    });
  }
  app.use(notFound);
  app.use(errorHandler({ maxBodyBytes: 64 * 1024, logError: opts.logError ?? ((m, e) => console.error(`hub: ${m}:`, e)) }));

  return { app, provisionHost: provision, hostRecords: bootstrap.hostRecords, streams: bootstrap.streams, close: () => bootstrap.close() };
}
