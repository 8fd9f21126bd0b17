/**
 * `startHub()`: the hub side on its own, listening on a port, for the demo,
 * the end-to-end tests and the benchmark.
 */
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { createApp, DEFAULT_PREFIX, type HubApp } from "./app.js";
import type { CredentialPolicy } from "./credentials.js";
import { type Db, openDb } from "./db.js";
import type { HostRecordInput, ProvisionedHost, SiteSettingsInput } from "./hosts.js";
import { ManifestFetcher } from "./manifests.js";
import { migrate } from "./migrate.js";
import type { BootstrapRouterDeps } from "./routes.js";

export interface StartHubOptions {
  /** 0 (default) picks a free port. */
  port?: number;
  /** Address to bind (default 127.0.0.1). */
  host?: string;
  /** PostgreSQL URL; without it an embedded PGlite (in memory, or in `dataDir`). */
  dbUrl?: string;
  dataDir?: string;
  /** Use this database instead of opening one (it is migrated, not closed). */
  db?: Db;
  /** Base of the artifact manifests. */
  artifactBaseUrl: string;
  /** Public base URL of this hub (default `http://<host>:<port>`). */
  publicUrl?: string;
  prefix?: string;
  /** Everything else in the site settings (node version and mirror, conat URLs, …). */
  settings?: Partial<SiteSettingsInput>;
  staleAfterS?: number;
  tokenTtlMs?: number;
  manifestTimeoutMs?: number;
  manifestTtlMs?: number;
  streamRecheckMs?: number;
  enableAdmin?: boolean;
  /** When host credentials are due for rotation, and a rotated one's grace (credentials.ts). */
  credentialPolicy?: CredentialPolicy;
  logError?: (message: string, error: unknown) => void;
  /** Who may view hosts and the fleet (default: loopback only); see BootstrapRouterDeps. */
  authorizeViewer?: BootstrapRouterDeps["authorizeViewer"];
  authorizeFleetViewer?: BootstrapRouterDeps["authorizeFleetViewer"];
  /** The hub's host records (host-records.ts), and how often refused deliveries are retried. */
  statusAdapter?: BootstrapRouterDeps["statusAdapter"];
  hostRecordsSweepMs?: number;
  hostRecordsTimeoutMs?: number;
  hostRecordsRetryBaseMs?: number;
}

export interface RunningHub {
  /** `http://host:port` of this hub. */
  url: string;
  /** Where the bootstrap router is mounted (`<publicUrl><prefix>`). */
  bootstrapUrl: string;
  db: Db;
  provisionHost(record: HostRecordInput, opts?: { secrets?: Record<string, string> }): Promise<ProvisionedHost>;
  /** The host-record reporter (null without a statusAdapter): flush() and sweep() for tests and tools. */
  hostRecords: HubApp["hostRecords"];
  close(): Promise<void>;
}

function listen(server: Server, port: number, host: string): Promise<AddressInfo> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => {
      server.off("error", reject);
      resolve(server.address() as AddressInfo);
    });
  });
}

export async function startHub(opts: StartHubOptions): Promise<RunningHub> {
  const ownDb = opts.db === undefined;
  const db = opts.db ?? (await openDb({ databaseUrl: opts.dbUrl, dataDir: opts.dataDir }));
  await migrate(db);
  const host = opts.host ?? "127.0.0.1";
  const prefix = opts.prefix ?? DEFAULT_PREFIX;
  // Listen first: the settings need the real port when none was given.
  const server = createServer();
  const addr = await listen(server, opts.port ?? 0, host);
  const url = `http://${host.includes(":") ? `[${host}]` : host}:${addr.port}`;
  const publicUrl = (opts.publicUrl ?? url).replace(/\/+$/, "");
  const bootstrapUrl = `${publicUrl}${prefix}`;
  const settings: SiteSettingsInput = {
    software_base_url: opts.artifactBaseUrl,
    bootstrap_url: bootstrapUrl,
    hub_url: publicUrl,
    conat_urls: [publicUrl],
    node_version: "20.18.1",
    ...opts.settings,
  };
  const hub: HubApp = createApp({
    db,
    settings,
    prefix,
    manifests: new ManifestFetcher({ timeoutMs: opts.manifestTimeoutMs, ttlMs: opts.manifestTtlMs }),
    tokenTtlMs: opts.tokenTtlMs,
    staleAfterS: opts.staleAfterS,
    streamRecheckMs: opts.streamRecheckMs,
    enableAdmin: opts.enableAdmin,
    credentialPolicy: opts.credentialPolicy,
    logError: opts.logError,
    authorizeViewer: opts.authorizeViewer,
    authorizeFleetViewer: opts.authorizeFleetViewer,
    statusAdapter: opts.statusAdapter,
    hostRecordsSweepMs: opts.hostRecordsSweepMs,
    hostRecordsTimeoutMs: opts.hostRecordsTimeoutMs,
    hostRecordsRetryBaseMs: opts.hostRecordsRetryBaseMs,
  });
  server.on("request", hub.app);
  return {
    url,
    bootstrapUrl,
    db,
    provisionHost: hub.provisionHost,
    hostRecords: hub.hostRecords,
    async close() {
      await hub.close();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      if (ownDb) await db.close();
    },
  };
}
