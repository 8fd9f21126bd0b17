/**
 * The whole rig for one run of tests, the demo or the benchmark: artifacts
 * built and published by an artifact server on 127.0.0.1, a hub from
 * @cocalc/server on embedded PGlite, and helpers to provision a throwaway
 * host there and run the hub's real stub inside it as root, the way
 * cloud-init would.
 *
 * Variants (serial mode, a wrong checksum) are more hubs on the same
 * database, each with its own site settings or artifact site.
 */
import { randomBytes, randomUUID } from "node:crypto";
import { mkdirSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import type { Arch, BootstrapConfig } from "@cocalc/project-host-bootstrap";
import { type HostStatus, type RunningHub, startHub } from "@cocalc/server";
import { type ArtifactServer, startArtifactServer, type TokenBucket } from "./artifact-server.js";
import {
  type BuiltBundle,
  type BuiltDeb,
  type BuiltFile,
  type BuiltNode,
  type BundleName,
  type BundleSpec,
  buildBundle,
  buildBundleImage,
  buildCloudflaredDeb,
  buildNodeMirror,
  DEFAULT_NODE,
  type NodeMirrorSpec,
  nodeArchOf,
  PROJECT_HOST_EXEC,
  type PublishedSite,
  publishSite,
  testBundleSpecs,
} from "./artifacts.js";
import type { ThrowawayHost } from "./host.js";
import { cacheDir } from "./paths.js";
import type { RunResult } from "./proc.js";

/** A small apt set for tests; the benchmark passes the real list. */
/**
 * What the bootstrap installs on a throwaway host: btrfs, xz, and what a
 * rootless container run and time sync need (the parity with upstream's list;
 * curl, rsync, vim and cron are left out: nothing here uses them).
 */
export const TEST_APT_PACKAGES = ["btrfs-progs", "xz-utils", "podman", "crun", "uidmap", "slirp4netns", "passt", "fuse-overlayfs", "chrony"];

/**
 * Extra env entries the hub adds for every test host: values that systemd's
 * EnvironmentFile= and the daemon's own parser must read the same (the
 * stand-in daemon refuses to start when they do not).
 */
export const TEST_EXTRA_ENV: Record<string, string> = {
  COCALC_TEST_BRACKETS: "/btrfs/project-[project_id]/.local/share/cocalc/persist",
  COCALC_TEST_SPACES: "  two  spaces  inside and around ",
  COCALC_TEST_EQUALS: "a=b==c",
  COCALC_TEST_DOUBLE_QUOTES: 'say "hi" to $HOME and `date` with a back\\slash',
  COCALC_TEST_SINGLE_QUOTE: "it's here",
  COCALC_TEST_HASH: "#not a comment",
};
/** The throwaway hosts are Debian 12, not the default Ubuntu 24.04. */
export const TESTBED_OS = { id: "debian", min_version: "12" } as const;
/** Root disk size the hub is told: the btrfs loop image comes out at 2 GB. */
export const TEST_DISK_SIZE_GB = 12;
/** Where the stub lands in the host, like cloud-init's scripts (root-only). */
export const STUB_PATH = "/root/cocalc-bootstrap-stub.sh";

export interface TestbedOptions {
  log?: (line: string) => void;
  bundles?: BundleSpec[];
  node?: NodeMirrorSpec;
  aptPackages?: string[];
  /** Artifact server limits (the benchmark's knobs). */
  bandwidthBytesPerSec?: number;
  /** A token bucket shared with another server (the benchmark's apt cache); overrides bandwidthBytesPerSec. */
  bucket?: TokenBucket;
  latencyMs?: number;
  hubPort?: number;
  /** PGlite data directory (persisted); in memory when absent. */
  hubDataDir?: string;
  /** Work directory for the published site (default: under the cache). */
  workDir?: string;
  /** Mount the hub's loopback-only `POST /admin/hosts` (the demo provisions through it). */
  enableAdmin?: boolean;
  /** Arch of the hosts (manifests, Node mirror, host records); default amd64. */
  arch?: Arch;
  /** OS release the hosts must have (site setting); default TESTBED_OS. */
  os?: { id: string; min_version: string };
}

export interface HubVariant {
  parallel?: boolean;
  /** This bundle's manifest carries a wrong sha256. */
  wrongChecksum?: BundleName;
  /** Publish every bundle as `.tar.zst` (zstd -19) instead of `.tar.xz`. */
  zstd?: boolean;
  /** Publish each bundle's squashfs image beside its archive (manifests name it). */
  images?: boolean;
  /** With images: this bundle's image is served corrupted (its manifest keeps the true sha256). */
  corruptImage?: BundleName;
  /** These bundles are published at these versions instead (an upgrade). */
  upgrade?: Partial<Record<BundleName, string>>;
  /** With upgrade.project_host: that version's daemon fails its health check (503). */
  unhealthyDaemon?: boolean;
  /** service.health_timeout_s of the configs (site setting); the config's default when absent. */
  healthTimeoutS?: number;
  /** Publish the artifacts under this base URL instead of the artifact server's (a proxy in front of it). */
  artifactUrl?: string;
  /** The hub's public URL (a proxy in front of it): the config's hub and events URLs. */
  publicUrl?: string;
}

export interface ProvisionedTestHost {
  hostId: string;
  hostName: string;
  token: string;
  stub: string;
  config: BootstrapConfig;
  hub: RunningHub;
  /** The progress page. */
  pageUrl: string;
  statusUrl: string;
  healthUrl: string;
  /** The tunnel token the hub holds for this host (secret `cloudflared-token`). */
  tunnelToken: string;
}

export interface BootstrapRun extends RunResult {
  wallMs: number;
}

export class Testbed {
  private readonly variants = new Map<string, Promise<RunningHub>>();
  private readonly sites = new Map<string, PublishedSite>();

  private constructor(
    readonly opts: TestbedOptions,
    readonly artifactServer: ArtifactServer,
    readonly bundles: BuiltBundle[],
    readonly node: BuiltNode,
    readonly cloudflared: BuiltDeb,
    private readonly siteRoot: string,
    readonly hub: RunningHub,
  ) {
    this.variants.set(variantKey({}), Promise.resolve(hub));
  }

  get log(): (line: string) => void {
    return this.opts.log ?? (() => {});
  }

  /** Build (or reuse) the artifacts, serve them, start the hub. */
  static async start(opts: TestbedOptions = {}): Promise<Testbed> {
    const log = opts.log ?? (() => {});
    const bundles: BuiltBundle[] = [];
    for (const spec of opts.bundles ?? testBundleSpecs()) bundles.push(await buildBundle(spec, log));
    const node = await buildNodeMirror({ ...DEFAULT_NODE, ...opts.node, arch: nodeArchOf(opts.arch ?? "amd64") }, log);
    const cloudflared = await buildCloudflaredDeb(undefined, log);
    const siteRoot = opts.workDir ?? join(cacheDir(), "sites", `${process.pid}-${Date.now()}`);
    rmSync(siteRoot, { recursive: true, force: true });
    mkdirSync(siteRoot, { recursive: true });
    const artifactServer = await startArtifactServer({
      root: siteRoot,
      bandwidthBytesPerSec: opts.bandwidthBytesPerSec,
      ...(opts.bucket ? { bucket: opts.bucket } : {}),
      latencyMs: opts.latencyMs,
    });
    const site = publishSite(join(siteRoot, "main"), `${artifactServer.url}/main`, bundles, node, { arch: opts.arch, cloudflared });
    const hub = await startHub({
      port: opts.hubPort ?? 0,
      dataDir: opts.hubDataDir,
      artifactBaseUrl: site.baseUrl,
      settings: siteSettings(site, opts.aptPackages ?? TEST_APT_PACKAGES, {}, opts.os),
      // Manifests change between variants and benchmark runs: never serve a stale one.
      manifestTtlMs: 0,
      enableAdmin: opts.enableAdmin ?? false,
    });
    const bed = new Testbed(opts, artifactServer, bundles, node, cloudflared, siteRoot, hub);
    bed.sites.set("main", site);
    log(`hub ${hub.url}, artifacts ${artifactServer.url}`);
    return bed;
  }

  get site(): PublishedSite {
    return this.sites.get("main")!;
  }

  /** A hub on the same database whose settings or artifacts differ. */
  hubFor(variant: HubVariant = {}): Promise<RunningHub> {
    const key = variantKey(variant);
    let hub = this.variants.get(key);
    if (!hub) {
      hub = this.startVariant(variant);
      this.variants.set(key, hub);
    }
    return hub;
  }

  private async startVariant(variant: HubVariant): Promise<RunningHub> {
    let site = this.site;
    if (variant.wrongChecksum || variant.images || variant.upgrade || variant.artifactUrl || variant.zstd) {
      const name = variantKey(variant)
        .replace(/[^a-z0-9]+/gi, "-")
        .replace(/^-|-$/g, "");
      const bundles: BuiltBundle[] = [];
      for (const b of this.bundles) {
        const version = variant.upgrade?.[b.spec.artifact];
        const unhealthy = b.spec.artifact === "project_host" && variant.unhealthyDaemon ? { unhealthy: true } : {};
        const compression = variant.zstd ? { compression: "zstd" as const } : {};
        bundles.push(version || variant.zstd ? await buildBundle({ ...b.spec, ...compression, ...unhealthy, ...(version ? { version } : {}) }, this.log) : b);
      }
      const images: Partial<Record<BundleName, BuiltFile>> = {};
      if (variant.images) for (const b of bundles) images[b.spec.artifact] = await buildBundleImage(b, this.log);
      site = publishSite(join(this.siteRoot, name), `${variant.artifactUrl ?? this.artifactServer.url}/${name}`, bundles, this.node, {
        wrongChecksum: variant.wrongChecksum,
        arch: this.opts.arch,
        images,
        corruptImage: variant.corruptImage,
        cloudflared: this.cloudflared,
      });
      this.sites.set(name, site);
    }
    return startHub({
      db: this.hub.db,
      publicUrl: variant.publicUrl,
      artifactBaseUrl: site.baseUrl,
      settings: siteSettings(site, this.opts.aptPackages ?? TEST_APT_PACKAGES, variant, this.opts.os),
      manifestTtlMs: 0,
    });
  }

  /** Register `host` (a throwaway host, or this machine) with the hub (a variant of it when asked); gives its stub and token. */
  async provision(host: Pick<ThrowawayHost, "name" | "user">, variant: HubVariant = {}): Promise<ProvisionedTestHost> {
    const hub = await this.hubFor(variant);
    // The hosts share this machine's network namespace: every daemon needs its own port.
    const port = await freePort();
    const internalUrl = `http://127.0.0.1:${port}`;
    const secrets = testSecrets();
    const p = await hub.provisionHost(testHostRecord(host, internalUrl, this.opts.arch), { secrets });
    const tunnelToken = secrets["cloudflared-token"]!;
    return {
      hostId: p.hostId,
      hostName: host.name,
      token: p.token,
      stub: p.stub,
      config: p.config,
      hub,
      pageUrl: `${p.baseUrl}/`,
      statusUrl: `${p.baseUrl}/status`,
      healthUrl: p.config.service.health_url,
      tunnelToken,
    };
  }

  /**
   * Register the same host again (same id, name and daemon port) with a
   * variant's hub, as the hub does when a host's software changes: a new
   * config from the current manifests, a new token and stub.
   */
  async reprovision(p: ProvisionedTestHost, variant: HubVariant = {}): Promise<ProvisionedTestHost> {
    const hub = await this.hubFor(variant);
    const internalUrl = p.config.env.COCALC_HOST_INTERNAL_URL!;
    const record = { ...testHostRecord({ name: p.hostName, user: p.config.bootstrap_user }, internalUrl, this.opts.arch), id: p.hostId };
    const n = await hub.provisionHost(record, { secrets: testSecrets() });
    return { ...p, token: n.token, stub: n.stub, config: n.config, hub, pageUrl: `${n.baseUrl}/`, statusUrl: `${n.baseUrl}/status` };
  }

  /**
   * Run the stub inside the host as root with BOOTSTRAP_USER, as cloud-init
   * would: the stub is a root-only file, never an argument.
   */
  async bootstrap(
    host: ThrowawayHost,
    p: ProvisionedTestHost,
    opts: { onOutput?: (chunk: string) => void; args?: string[]; timeoutMs?: number } = {},
  ): Promise<BootstrapRun> {
    host.writeFile(STUB_PATH, p.stub, { mode: 0o700, owner: "root" });
    const t0 = Date.now();
    const r = await host.exec(["sh", STUB_PATH, ...(opts.args ?? [])], {
      env: { BOOTSTRAP_USER: host.user },
      allowFailure: true,
      timeoutMs: opts.timeoutMs ?? 15 * 60_000,
      onOutput: opts.onOutput ? (chunk) => opts.onOutput!(chunk) : undefined,
    });
    return { ...r, wallMs: Date.now() - t0 };
  }

  async status(p: ProvisionedTestHost): Promise<HostStatus> {
    const r = await fetch(p.statusUrl);
    if (!r.ok) throw new Error(`GET ${p.statusUrl}: ${r.status} ${await r.text()}`);
    return (await r.json()) as HostStatus;
  }

  /** Poll the hub until the run is done or failed (the sender may lag the exit a little). */
  async settledStatus(p: ProvisionedTestHost, timeoutMs = 30_000): Promise<HostStatus> {
    const deadline = Date.now() + timeoutMs;
    let s = await this.status(p);
    while ((s.state === "running" || s.state === "pending" || s.state === "stale") && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 250));
      s = await this.status(p);
    }
    return s;
  }

  async close(): Promise<void> {
    const hubs = await Promise.all(this.variants.values());
    // Variants first: they borrow the main hub's database.
    for (const h of hubs.reverse()) await h.close().catch(() => {});
    await this.artifactServer.close();
    if (!this.opts.workDir) rmSync(this.siteRoot, { recursive: true, force: true });
  }
}

/**
 * The secrets the hub stores for a test host: the conat password (a secret
 * every host fetches) and a tunnel token, so that a tunnel can be switched on
 * for any of them.
 */
export function testSecrets(): Record<string, string> {
  return { "conat-password": randomBytes(24).toString("base64url"), "cloudflared-token": randomBytes(48).toString("base64") };
}

/**
 * The hub's record of a throwaway host (what a cloud provider's API would have
 * told it): the daemon listens, without TLS, on the port of `internalUrl` (the
 * hosts share this machine's network, so each has its own), and the hub adds
 * the env entries both parsers must read the same.
 */
export function testHostRecord(host: Pick<ThrowawayHost, "name" | "user">, internalUrl: string, arch: Arch = "amd64") {
  return {
    id: randomUUID(),
    name: host.name,
    region: "testbed-1",
    daemon_port: Number(new URL(internalUrl).port),
    daemon_https: false,
    env: TEST_EXTRA_ENV,
    runtime_user: host.user,
    arch,
    disk_size_gb: TEST_DISK_SIZE_GB,
    internal_url: internalUrl,
    // No metadata rule by default: the hosts share this machine's network namespace, so a host's
    // nftables table would be this machine's (the e2e "metadata" case turns it on with a stand-in address).
    metadata_addresses: [] as string[],
  };
}

function variantKey(v: HubVariant): string {
  return JSON.stringify({
    parallel: v.parallel ?? true,
    wrong: v.wrongChecksum ?? null,
    ...(v.zstd ? { zstd: true } : {}),
    ...(v.images ? { images: true, corrupt: v.corruptImage ?? null } : {}),
    ...(v.upgrade ? { upgrade: v.upgrade } : {}),
    ...(v.unhealthyDaemon ? { unhealthy: true } : {}),
    ...(v.healthTimeoutS ? { health: v.healthTimeoutS } : {}),
    ...(v.artifactUrl || v.publicUrl ? { via: [v.artifactUrl ?? null, v.publicUrl ?? null] } : {}),
  });
}

/** Site settings for the testbed's hub: our mirror, our manifests, Debian 12 unless told otherwise. */
function siteSettings(
  site: PublishedSite,
  aptPackages: string[],
  variant: HubVariant,
  os: TestbedOptions["os"] = TESTBED_OS,
): Record<string, unknown> & { node_version: string } {
  const layout = (a: BundleName) => ({
    strip_components: site.bundles[a].strip_components,
    expected_files: site.bundles[a].expected_files,
    executables: site.bundles[a].executables,
  });
  return {
    project_host_exec: PROJECT_HOST_EXEC,
    node_version: site.node.version,
    node_dist_url: site.node.dist_url,
    apt_packages: aptPackages,
    secret_names: ["conat-password"],
    parallel: variant.parallel ?? true,
    ...(variant.healthTimeoutS ? { health_timeout_s: variant.healthTimeoutS } : {}),
    os_release: { ...os },
    layouts: { project_host: layout("project_host"), project: layout("project"), tools: layout("tools") },
  };
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}
