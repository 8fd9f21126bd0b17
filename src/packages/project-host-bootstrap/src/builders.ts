/**
 * Typed builders: the hub passes what it knows about a host (`HostFacts`) and
 * gets back a complete, validated `BootstrapConfig`.
 *
 * Everything the schema has is accepted in the schema's own input type
 * (`z.input`, so defaults may be left out); what can be derived is derived
 * here, in one place:
 *
 * - `home`           = `/home/<user>` unless given
 * - `bootstrap_root` = `<home>/cocalc-host`
 * - `bootstrap_dir`  = `<bootstrap_root>/bootstrap`
 * - `btrfs.image_path` = `<bootstrap_root>/btrfs.img`
 * - `btrfs.image_size_gb` = `imageSizeGb(disk_size_gb)` unless given
 * - `apt.packages`   = `defaultAptPackages` unless given
 * - `os`             = Ubuntu 24.04 or newer unless given
 *
 * The facts are never mutated (they are deep-copied first), and every problem
 * is reported at once in a `BootstrapConfigError` naming each field path.
 */
import type { z } from "zod/v4";
import {
  type AptSchema,
  type Arch,
  type ArtifactsSchema,
  type BootstrapConfig,
  type BootstrapConfigInput,
  BootstrapConfigSchema,
  type CloudflaredSchema,
  CONFIG_FILE_NAME,
  type ConfigIssue,
  type DaemonSchema,
  type DataDiskSchema,
  formatPath,
  type HostSchema,
  type HubSchema,
  type NodeSchema,
  type OsSchema,
  SCHEMA_VERSION,
  type ServiceSchema,
  TOKEN_FILE_NAME,
  type TunnelSchema,
} from "./config.js";

/** The old bootstrap's package list: what a project host needs from apt. */
export const defaultAptPackages: readonly string[] = Object.freeze([
  "podman",
  "btrfs-progs",
  "uidmap",
  "slirp4netns",
  "passt", // podman 5's default rootless network (pasta); podman 4 uses slirp4netns
  "fuse-overlayfs",
  "curl",
  "xz-utils",
  "rsync",
  "vim",
  "crun",
  "cron",
  "chrony",
]);

/** Hosts run Ubuntu 24.04 or newer unless the hub says otherwise. */
export const defaultOs: Readonly<z.input<typeof OsSchema>> = Object.freeze({ id: "ubuntu", min_version: "24.04" });

/**
 * Space on the root disk kept out of the btrfs loop image: the OS, apt
 * packages, the three bundles, Node.js, logs and container layers live
 * there. At least this many GB ...
 */
export const IMAGE_RESERVE_MIN_GB = 10;
/** ... or this fraction of the disk, whichever is larger. */
export const IMAGE_RESERVE_FRACTION = 0.1;

/**
 * Size of the sparse btrfs loop image for a root disk of `diskSizeGb`:
 * the disk minus max(10 GB, 10 %), rounded down, and at least 1 GB (a tiny
 * disk still gets a usable, if small, /btrfs). 100 GB -> 90, 50 -> 40, 8 -> 1.
 */
export function imageSizeGb(diskSizeGb: number): number {
  const reserve = Math.max(IMAGE_RESERVE_MIN_GB, diskSizeGb * IMAGE_RESERVE_FRACTION);
  return Math.max(1, Math.floor(diskSizeGb - reserve));
}

/** Everything the hub knows about one host, in the schema's input types. */
export interface HostFacts {
  host: z.input<typeof HostSchema>;
  /** The non-root user that runs the bootstrap and the daemon. */
  bootstrap_user: string;
  /** That user's home; default `/home/<bootstrap_user>`. */
  home?: string;
  /** Size of the root disk in GB; the btrfs loop image is derived from it. */
  disk_size_gb: number;
  arch: Arch;
  os?: z.input<typeof OsSchema>;
  /** The three bundles, already chosen for `arch` (url, sha256 or null, version, size). */
  artifacts: z.input<typeof ArtifactsSchema>;
  node: z.input<typeof NodeSchema>;
  /** apt settings; `packages` defaults to `defaultAptPackages`. */
  apt?: z.input<typeof AptSchema>;
  hub: z.input<typeof HubSchema>;
  conat_urls: string[];
  secrets?: string[];
  service: z.input<typeof ServiceSchema>;
  btrfs?: {
    mount_point?: string;
    /** Overrides the size derived from `disk_size_gb`. */
    image_size_gb?: number;
    data_disk?: z.input<typeof DataDiskSchema> | null;
  };
  tunnel?: z.input<typeof TunnelSchema> | null;
  /** What the daemon's env file needs (region, URLs, public IP, ssh server, TLS, port). */
  daemon?: z.input<typeof DaemonSchema>;
  /** A Cloudflare tunnel: the pinned .deb and the tunnel's host name. */
  cloudflared?: z.input<typeof CloudflaredSchema> | null;
  env?: Record<string, string>;
  parallel?: boolean;
}

/** Paths that follow from the user (and optionally their home). */
export interface BootstrapPaths {
  home: string;
  bootstrap_root: string;
  bootstrap_dir: string;
  image_path: string;
  config_file: string;
  token_file: string;
}

export function bootstrapPaths(user: string, home?: string): BootstrapPaths {
  const h = home ?? `/home/${user}`;
  const root = `${h}/cocalc-host`;
  const dir = `${root}/bootstrap`;
  return {
    home: h,
    bootstrap_root: root,
    bootstrap_dir: dir,
    image_path: `${root}/btrfs.img`,
    config_file: `${dir}/${CONFIG_FILE_NAME}`,
    token_file: `${dir}/${TOKEN_FILE_NAME}`,
  };
}

/** A config that failed validation; `issues` has every problem with its path. */
export class BootstrapConfigError extends Error {
  override readonly name = "BootstrapConfigError";
  readonly issues: readonly ConfigIssue[];

  constructor(issues: readonly ConfigIssue[], what = "bootstrap config") {
    super(`invalid ${what} (${issues.length} problem${issues.length === 1 ? "" : "s"}):\n${issues.map(describeIssue).join("\n")}`);
    this.issues = issues;
  }
}

function describeIssue(issue: ConfigIssue): string {
  return `  ${formatPath(issue.path)}: ${issue.message}`;
}

/** Short JSON rendering of an offending value for error messages. */
function showValue(value: unknown): string {
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = String(value);
  }
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

function checkDiskSize(facts: HostFacts): ConfigIssue[] {
  const d = facts.disk_size_gb;
  if (typeof d === "number" && Number.isFinite(d) && d > 0) return [];
  return [{ path: ["disk_size_gb"], message: `host fact must be a positive number of GB (got ${showValue(d)})` }];
}

/** The config before validation: facts plus everything derived. */
function assemble(facts: HostFacts): BootstrapConfigInput {
  const paths = bootstrapPaths(facts.bootstrap_user, facts.home);
  const btrfs = facts.btrfs ?? {};
  const apt = facts.apt ?? {};
  const config: BootstrapConfigInput = {
    schema_version: SCHEMA_VERSION,
    host: facts.host,
    bootstrap_user: facts.bootstrap_user,
    home: paths.home,
    bootstrap_root: paths.bootstrap_root,
    bootstrap_dir: paths.bootstrap_dir,
    arch: facts.arch,
    os: facts.os ?? { ...defaultOs },
    hub: facts.hub,
    conat_urls: facts.conat_urls,
    artifacts: facts.artifacts,
    node: facts.node,
    apt: { ...apt, packages: apt.packages ?? [...defaultAptPackages] },
    btrfs: {
      ...btrfs,
      image_path: paths.image_path,
      image_size_gb: btrfs.image_size_gb ?? imageSizeGb(facts.disk_size_gb),
    },
    service: facts.service,
  };
  // Optional facts are copied only when present, so the schema's defaults apply.
  if (facts.secrets !== undefined) config.secrets = facts.secrets;
  if (facts.tunnel !== undefined) config.tunnel = facts.tunnel;
  if (facts.daemon !== undefined) config.daemon = facts.daemon;
  if (facts.cloudflared !== undefined) config.cloudflared = facts.cloudflared;
  if (facts.env !== undefined) config.env = facts.env;
  if (facts.parallel !== undefined) config.parallel = facts.parallel;
  return config;
}

/**
 * Validate a whole config (input type) and return the output type, or throw
 * a `BootstrapConfigError` listing every problem with its path and value.
 */
export function parseBootstrapConfig(input: unknown): BootstrapConfig {
  const result = BootstrapConfigSchema.safeParse(input, { reportInput: true });
  if (result.success) return result.data;
  throw new BootstrapConfigError(
    result.error.issues.map((i) => ({
      path: i.path.map((p) => (typeof p === "symbol" ? String(p) : p)),
      message: "input" in i && i.input !== undefined ? `${i.message} (got ${showValue(i.input)})` : i.message,
    })),
  );
}

/** Build and validate the bootstrap config of one host from its facts. */
export function buildBootstrapConfig(facts: HostFacts): BootstrapConfig {
  // A private deep copy: nothing below (or zod) can touch the caller's object,
  // and the returned config shares no arrays or objects with it.
  const own = structuredClone(facts);
  const factIssues = checkDiskSize(own);
  if (factIssues.length > 0) throw new BootstrapConfigError(factIssues, "host facts");
  return parseBootstrapConfig(assemble(own));
}
