/**
 * A host's bootstrap config, assembled from what the hub knows: the host
 * record, the site settings and the artifact manifests. Everything about the
 * config and the stub comes from @cocalc/project-host-bootstrap; this module
 * only gathers the facts and refuses bad ones with a clear message.
 */
import {
  AbsPath,
  ARCHES,
  ARTIFACT_NAMES,
  type ArtifactName,
  type BootstrapConfig,
  BootstrapConfigError,
  buildBootstrapConfig,
  type HostFacts,
  HttpUrl,
  METADATA_ADDRESS,
  OsSchema,
  renderStub,
} from "@cocalc/project-host-bootstrap";
import {
  DNS_NAME_RE,
  ENV_NAME_RE,
  HOST_NAME_RE,
  HOST_PORT_RE,
  IP_RE,
  IPV4_RE,
  NODE_VERSION_RE,
  REGION_RE,
  SECRET_NAME_RE,
  USER_RE,
  UUID_RE,
} from "@cocalc/project-host-bootstrap/contract";
import { z } from "zod/v4";
import type { Db } from "./db.js";
import { type BootstrapStatusAdapter, pendingMetadata, recordDelivered } from "./host-records.js";
import { ManifestError, type ManifestFetcher, type ResolvedArtifact } from "./manifests.js";
import { saveHost, saveSecret } from "./store.js";
import { DEFAULT_TOKEN_TTL_MS, issueTokenIn } from "./tokens.js";

/**
 * Provisioning refused for a reason the operator can fix (a bad host record,
 * a manifest that does not fit, a config the builders refuse, a missing
 * secret): its message is meant to be shown. Anything else provisionHost
 * throws (a database failure, a broken site setting) is internal.
 */
export class ProvisionRefusedError extends Error {
  override readonly name = "ProvisionRefusedError";
}

function zodMessage(what: string, error: z.ZodError): string {
  return `invalid ${what}: ${error.issues.map((i) => `${i.path.length ? `${i.path.join(".")}: ` : ""}${i.message}`).join("; ")}`;
}

/** The hub's record of one host (what the old bootstrap-host.ts read from the hosts table). */
export const HostRecordSchema = z.strictObject({
  id: z.string().regex(UUID_RE, { message: "must be a lowercase UUID" }),
  name: z.string().regex(HOST_NAME_RE, { message: "must be a lowercase RFC 1123 host label" }),
  region: z.string().regex(REGION_RE).default(""),
  runtime_user: z
    .string()
    .regex(USER_RE)
    .refine((u) => u !== "root", { message: "must not be root" }),
  arch: z.enum(ARCHES),
  disk_size_gb: z.number().positive(),
  data_disk_candidates: z.array(AbsPath).max(16).default([]),
  data_disk_min_size_gb: z.int().min(1).default(10),
  /** How users reach the host (passed to the daemon). */
  public_url: HttpUrl.nullable().default(null),
  /** Where the daemon listens on the host itself; its health endpoint is below it. */
  internal_url: HttpUrl,
  /** The host's public IP when the provider said; null: the hub fills in the address the host's stub called from. */
  public_ip: z.string().regex(IP_RE).nullable().default(null),
  /** PROJECT_HOST_SSH_SERVER; null: <public ip>:2222. */
  ssh_server: z.string().regex(HOST_PORT_RE).nullable().default(null),
  /** TLS host name the daemon serves (COCALC_PROJECT_HOST_HTTPS_HOSTNAME). */
  https_hostname: z.string().min(1).max(253).regex(DNS_NAME_RE).nullable().default(null),
  /** The daemon's PORT (443; 9002 behind a tunnel) and whether it terminates TLS itself. */
  daemon_port: z.int().min(1).max(65535).default(443),
  daemon_https: z.boolean().default(true),
  /** The host is reached through a Cloudflare tunnel at this name: cloudflared (the .deb from its manifest) is installed. */
  tunnel_hostname: z.string().min(1).max(253).regex(DNS_NAME_RE).nullable().default(null),
  /**
   * The cloud metadata service's addresses: only root on the host may reach them (user-data holds the
   * stub and its token). [] for no rule (a provider without one).
   */
  metadata_addresses: z
    .array(z.string().regex(IPV4_RE, { message: "must be an IPv4 address" }))
    .max(8)
    .default([METADATA_ADDRESS]),
  /** Extra entries for the daemon's env file (win over the derived ones). */
  env: z.record(z.string().regex(ENV_NAME_RE), z.string()).default({}),
});
export type HostRecord = z.output<typeof HostRecordSchema>;
export type HostRecordInput = z.input<typeof HostRecordSchema>;

const ArtifactLayoutSchema = z.strictObject({
  strip_components: z.int().min(0).max(8).default(0),
  expected_files: z.array(z.string()).default([]),
  executables: z.array(z.string()).default([]),
});

/** Site-wide settings (the hub's server settings) that every host's config uses. */
export const SiteSettingsSchema = z.strictObject({
  /** Base of the artifact manifests: `<software_base_url>/<artifact>/latest-<os>-<arch>.json`. */
  software_base_url: HttpUrl,
  /** Public URL where the bootstrap router is mounted, e.g. `https://hub.example.com/bootstrap`. */
  bootstrap_url: HttpUrl,
  hub_url: HttpUrl,
  conat_urls: z.array(HttpUrl).min(1),
  node_version: z.string().regex(NODE_VERSION_RE),
  node_dist_url: HttpUrl.default("https://nodejs.org/dist"),
  os: z.string().default("linux"),
  /** Expected OS release on the hosts (`ID`, lowest `VERSION_ID`); default Ubuntu 24.04 (the builders' default). */
  os_release: OsSchema.optional(),
  /** Daemon executable inside the project-host bundle: upstream's single executable (a Node SEA). */
  project_host_exec: z.string().default("cocalc-project-host"),
  health_path: z.string().startsWith("/").default("/healthz"),
  apt_packages: z.array(z.string()).optional(),
  parallel: z.boolean().default(true),
  /** Installed versions each host keeps per bundle (current included); absent: the config's default (2). */
  keep_versions: z.int().min(1).max(20).optional(),
  /** How long a host waits for the daemon's health check after a (re)start before it rolls an upgrade back. */
  health_timeout_s: z.int().min(1).max(3600).optional(),
  /** How each bundle unpacks; upstream's by default (UPSTREAM.md: project-host strip 2, project and tools strip 1). */
  layouts: z.partialRecord(z.enum(ARTIFACT_NAMES), ArtifactLayoutSchema).default({
    project_host: { strip_components: 2, expected_files: [], executables: ["cocalc-project-host"] },
    project: { strip_components: 1, expected_files: [], executables: [] },
    tools: { strip_components: 1, expected_files: [], executables: [] },
  }),
  /**
   * Offer bundle images (when a manifest names one) beside the archives; the
   * host mounts them when its kernel can. false: archives only.
   */
  bundle_images: z.boolean().default(true),
  /** Secret names every host fetches (values are stored per host at provisioning). */
  secret_names: z.array(z.string().regex(SECRET_NAME_RE)).default([]),
});
export type SiteSettings = z.output<typeof SiteSettingsSchema>;
export type SiteSettingsInput = z.input<typeof SiteSettingsSchema>;

/** Base URL of one host's routes; the stub GETs `<it>/bootstrap.py` and `<it>/config`. */
export function hostBaseUrl(settings: Pick<SiteSettings, "bootstrap_url">, hostId: string): string {
  return `${settings.bootstrap_url.replace(/\/+$/, "")}/hosts/${hostId}`;
}

/** All three manifests, fetched together; every refusal is reported at once. */
export async function resolveArtifacts(
  fetcher: ManifestFetcher,
  settings: SiteSettings,
  arch: HostRecord["arch"],
): Promise<Record<ArtifactName, ResolvedArtifact>> {
  const results = await Promise.allSettled(ARTIFACT_NAMES.map((a) => fetcher.artifact(settings.software_base_url, a, settings.os, arch)));
  const failures = results.flatMap((r) => (r.status === "rejected" ? [r.reason as unknown] : []));
  const internal = failures.find((e) => !(e instanceof ManifestError));
  if (internal !== undefined) throw internal;
  const errors = failures.map((e) => (e as ManifestError).message);
  if (errors.length > 0) throw new ProvisionRefusedError(`cannot assemble the host config:\n  ${errors.join("\n  ")}`);
  const out = {} as Record<ArtifactName, ResolvedArtifact>;
  ARTIFACT_NAMES.forEach((a, i) => {
    out[a] = (results[i] as PromiseFulfilledResult<ResolvedArtifact>).value;
  });
  return out;
}

function artifactFacts(artifacts: Record<ArtifactName, ResolvedArtifact>, settings: SiteSettings): HostFacts["artifacts"] {
  const one = (a: ArtifactName) => ({
    url: artifacts[a].url,
    sha256: artifacts[a].sha256,
    version: artifacts[a].version,
    size_bytes: artifacts[a].size_bytes,
    ...settings.layouts[a],
    image: settings.bundle_images ? artifacts[a].image : null,
  });
  return { project_host: one("project_host"), project: one("project"), tools: one("tools") };
}

/** The builder's facts for this host: pure, no I/O. */
export function hostFacts(
  record: HostRecord,
  settings: SiteSettings,
  artifacts: Record<ArtifactName, ResolvedArtifact>,
  cloudflared: ResolvedArtifact | null = null,
): HostFacts {
  const base = hostBaseUrl(settings, record.id);
  const env: Record<string, string> = { COCALC_HUB_URL: settings.hub_url, COCALC_HOST_INTERNAL_URL: record.internal_url, ...record.env };
  const facts: HostFacts = {
    host: { id: record.id, name: record.name },
    bootstrap_user: record.runtime_user,
    disk_size_gb: record.disk_size_gb,
    arch: record.arch,
    artifacts: artifactFacts(artifacts, settings),
    node: { version: settings.node_version, dist_url: settings.node_dist_url },
    hub: { url: base, events_url: `${base}/events`, secrets_url: `${base}/secrets` },
    conat_urls: settings.conat_urls,
    secrets: settings.secret_names,
    service: {
      exec: settings.project_host_exec,
      health_url: `${record.internal_url.replace(/\/+$/, "")}${settings.health_path}`,
      ...(settings.health_timeout_s !== undefined ? { health_timeout_s: settings.health_timeout_s } : {}),
    },
    daemon: {
      region: record.region,
      public_url: record.public_url,
      internal_url: record.internal_url,
      public_ip: record.public_ip,
      ssh_server: record.ssh_server,
      https_hostname: record.https_hostname,
      software_base_url: settings.software_base_url,
      port: record.daemon_port,
      https: record.daemon_https,
    },
    env,
    parallel: settings.parallel,
    ...(settings.keep_versions !== undefined ? { keep_versions: settings.keep_versions } : {}),
  };
  if (record.tunnel_hostname && cloudflared) {
    const { url, sha256, version, size_bytes } = cloudflared;
    facts.cloudflared = { deb: { url, sha256, version, size_bytes }, hostname: record.tunnel_hostname };
  }
  facts.metadata_block = record.metadata_addresses.length > 0 ? { addresses: record.metadata_addresses } : null;
  if (settings.apt_packages) facts.apt = { packages: settings.apt_packages };
  if (settings.os_release) facts.os = settings.os_release;
  if (record.data_disk_candidates.length > 0) {
    facts.btrfs = { data_disk: { candidates: record.data_disk_candidates, min_size_gb: record.data_disk_min_size_gb } };
  }
  return facts;
}

/**
 * The config as the host fetches it: when the hub knows no public IP for the
 * host, the address its stub called from (Express's `req.ip`, which honours
 * the app's "trust proxy" setting behind a proxy). Never a third-party
 * "what is my IP" service.
 */
export function withCallerAddress<C>(config: C, address: string | undefined): C {
  const daemon = (config as Partial<BootstrapConfig> | null)?.daemon; // configs stored before the daemon section have none
  if (!daemon || daemon.public_ip !== null || !address) return config;
  const ip = address.startsWith("::ffff:") ? address.slice("::ffff:".length) : address;
  return IP_RE.test(ip) ? { ...config, daemon: { ...daemon, public_ip: ip } } : config;
}

/** cloudflared's .deb for a tunnel host: the fourth manifest, refused like the other three. */
async function tunnelArtifact(fetcher: ManifestFetcher, settings: SiteSettings, arch: HostRecord["arch"]): Promise<ResolvedArtifact> {
  try {
    return await fetcher.artifact(settings.software_base_url, "cloudflared", settings.os, arch);
  } catch (err) {
    if (!(err instanceof ManifestError)) throw err;
    throw new ProvisionRefusedError(`cannot assemble the host config (the record has a tunnel_hostname):\n  ${err.message}`);
  }
}

/** Host record + site settings + manifests → validated config (throws with the reasons). */
export async function assembleHostConfig(
  recordInput: HostRecordInput,
  settingsInput: SiteSettingsInput,
  fetcher: ManifestFetcher,
): Promise<{ record: HostRecord; config: BootstrapConfig; artifacts: Record<ArtifactName, ResolvedArtifact> }> {
  const parsed = HostRecordSchema.safeParse(recordInput);
  if (!parsed.success) throw new ProvisionRefusedError(zodMessage("host record", parsed.error));
  const record = parsed.data;
  const settings = SiteSettingsSchema.parse(settingsInput);
  const artifacts = await resolveArtifacts(fetcher, settings, record.arch);
  const cloudflared = record.tunnel_hostname ? await tunnelArtifact(fetcher, settings, record.arch) : null;
  try {
    return { record, config: buildBootstrapConfig(hostFacts(record, settings, artifacts, cloudflared)), artifacts };
  } catch (err) {
    if (err instanceof BootstrapConfigError) throw new ProvisionRefusedError(err.message);
    throw err;
  }
}

export interface ProvisionedHost {
  hostId: string;
  /** Base URL of the host's routes (`<bootstrap_url>/hosts/<id>`). */
  baseUrl: string;
  /** The bootstrap token: shown once, only its hash is stored. */
  token: string;
  expiresAt: Date;
  /** The shell stub for cloud-init or the connector (contains the token). */
  stub: string;
  config: BootstrapConfig;
}

export interface ProvisionDeps {
  db: Db;
  settings: SiteSettingsInput;
  manifests: ManifestFetcher;
  tokenTtlMs?: number;
  /** The hub's host records: told `pending` inside the provisioning transaction (host-records.ts). */
  statusAdapter?: BootstrapStatusAdapter;
}

/**
 * Register (or re-register) a host: assemble and store its config, store its
 * secrets, issue a fresh token (revoking older ones), record `pending` (and tell
 * the status adapter, if any), all in one transaction, and render its stub.
 */
export async function provisionHost(
  deps: ProvisionDeps,
  recordInput: HostRecordInput,
  opts: { secrets?: Record<string, string>; now?: Date } = {},
): Promise<ProvisionedHost> {
  const { record, config } = await assembleHostConfig(recordInput, deps.settings, deps.manifests);
  const settings = SiteSettingsSchema.parse(deps.settings);
  const now = opts.now ?? new Date();
  const missing = config.secrets.filter((name) => opts.secrets?.[name] === undefined);
  if (missing.length > 0) throw new ProvisionRefusedError(`host ${record.id}: no value for secret(s) ${missing.join(", ")}`);
  // One transaction: host, secrets, token and the host record's `pending` (through the adapter) or none of them.
  const { token, expiresAt } = await deps.db.transaction(async (tx) => {
    await saveHost(tx, { hostId: record.id, record, config, now });
    for (const [name, value] of Object.entries(opts.secrets ?? {})) await saveSecret(tx, record.id, name, value);
    const issued = await issueTokenIn(tx, record.id, { ttlMs: deps.tokenTtlMs ?? DEFAULT_TOKEN_TTL_MS, now });
    const pending = pendingMetadata(now);
    if (deps.statusAdapter) await deps.statusAdapter.onBootstrapStatus(record.id, pending, { db: tx });
    await recordDelivered(tx, record.id, pending, now, now);
    return issued;
  });
  const baseUrl = hostBaseUrl(settings, record.id);
  const stub = renderStub({ baseUrl, bootstrapDir: config.bootstrap_dir, bootstrapUser: config.bootstrap_user, token });
  return { hostId: record.id, baseUrl, token, expiresAt, stub, config };
}
