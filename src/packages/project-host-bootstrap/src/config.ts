/**
 * The bootstrap config: one JSON document that tells bootstrap.py everything
 * about the host it turns into a project host.
 *
 * This zod schema is the single source of truth. The JSON Schema in
 * `schema/bootstrap-config.schema.json` is generated from it (input side),
 * and `python/bootstrap.py` re-implements exactly these rules by hand; the
 * vectors in `fixtures/configs/` prove that both agree on every verdict and
 * every error path.
 *
 * Rules that bootstrap.py must mirror are kept deliberately simple: regexes,
 * integer ranges, absolute/relative paths, and a handful of cross-field
 * checks in `BootstrapConfigSchema`'s superRefine.
 */
import { UUID_PATTERN } from "@cocalc/util";
import { z } from "zod";

export const SCHEMA_VERSION = 1 as const;

export const ARCHES = ["amd64", "arm64"] as const;
export type Arch = (typeof ARCHES)[number];

export const ARTIFACT_NAMES = ["project_host", "project", "tools"] as const;
export type ArtifactName = (typeof ARTIFACT_NAMES)[number];

// --- primitives (each has a twin in bootstrap.py's "config" section) --------

export const SHA256_RE = /^[0-9a-f]{64}$/;
/** Lowercase canonical UUID; one definition, shared with `isValidUUID` in @cocalc/util. */
export const UUID_RE: RegExp = UUID_PATTERN;
/** POSIX-portable user name as useradd accepts it by default. */
export const USER_RE = /^[a-z_][a-z0-9_-]{0,31}$/;
/** RFC 1123 host label (one label, the host's short name). */
export const HOST_NAME_RE = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
export const VERSION_RE = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$/;
export const NODE_VERSION_RE = /^[0-9]+\.[0-9]+\.[0-9]+$/;
export const DEB_PACKAGE_RE = /^[a-z0-9][a-z0-9.+-]+$/;
export const ENV_NAME_RE = /^[A-Z_][A-Z0-9_]*$/;
export const SECRET_NAME_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
export const OS_ID_RE = /^[a-z0-9._-]+$/;
export const OS_VERSION_RE = /^[0-9]+(\.[0-9]+)*$/;
export const SYSTEMD_UNIT_RE = /^[A-Za-z0-9_.@-]+$/;
/** A DNS name (TLS host name, tunnel host). */
export const DNS_NAME_RE = /^[A-Za-z0-9.-]+$/;
/** An IPv4 or IPv6 address, textually (the hub writes what it saw). */
export const IP_RE = /^([0-9]{1,3}(\.[0-9]{1,3}){3}|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*)$/;
/** `host:port` or `[v6]:port`, as PROJECT_HOST_SSH_SERVER takes it. */
export const HOST_PORT_RE = /^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$/;
/** The old region names: letters, digits, `.`, `_`, `-` (may be empty). */
export const REGION_RE = /^[A-Za-z0-9._-]{0,64}$/;
export const MAX_PATH = 4096;

function pathSegments(p: string): string[] {
  return p.split("/").filter((s) => s.length > 0);
}

/** An absolute, normalised POSIX path: no `.`/`..` segments, no NUL. */
export const AbsPath = z
  .string()
  .min(1)
  .max(MAX_PATH)
  .refine(
    (p) =>
      p.startsWith("/") &&
      !p.includes("\0") &&
      !p.includes("//") &&
      (p === "/" || !p.endsWith("/")) &&
      pathSegments(p).every((s) => s !== "." && s !== ".."),
    { message: "must be an absolute, normalised path (starts with /, no . or .. segments, no // and no trailing /)" },
  );

/** A relative path inside a bundle: no leading `/`, no `.`/`..` segments. */
export const RelPath = z
  .string()
  .min(1)
  .max(MAX_PATH)
  .refine(
    (p) =>
      !p.startsWith("/") &&
      !p.includes("\0") &&
      !p.includes("//") &&
      !p.endsWith("/") &&
      pathSegments(p).every((s) => s !== "." && s !== ".."),
    { message: "must be a relative path inside the bundle (no leading /, no . or .. segments)" },
  );

/** http(s) URL. Plain http is allowed for local mirrors and tests. */
export const HttpUrl = z
  .string()
  .max(2048)
  .refine(isHttpUrl, { message: "must be an absolute http:// or https:// URL" });

/**
 * The plain form: lower-case scheme, `//`, and an authority without userinfo,
 * backslash or percent-escape. WHATWG URL alone also accepts `http:host`,
 * `http:\\host`, `http://@host`, `HTTP://host` and `http://%41`, which
 * bootstrap.py's urllib (and curl) would not fetch as written.
 */
const PLAIN_HTTP_URL_RE = /^https?:\/\/[^/\\?#@%\s]+([/?#]|$)/;

export function isHttpUrl(s: string): boolean {
  if (!PLAIN_HTTP_URL_RE.test(s)) return false;
  let u: URL;
  try {
    u = new URL(s);
  } catch {
    return false;
  }
  return (
    (u.protocol === "http:" || u.protocol === "https:") &&
    u.hostname.length > 0 &&
    u.username === "" &&
    u.password === "" &&
    !/\s/.test(s)
  );
}

export const Sha256 = z
  .string()
  .regex(SHA256_RE, { message: "must be 64 lowercase hex digits (a sha256)" });

const PosInt = (max: number) => z.int().min(1).max(max);
const NonNegInt = (max: number) => z.int().min(0).max(max);

// --- sections ----------------------------------------------------------------

export const HostSchema = z
  .strictObject({
    id: z.string().regex(UUID_RE, { message: "must be a lowercase UUID" }).describe("The host's id in the hub (UUID)."),
    name: z.string().regex(HOST_NAME_RE, { message: "must be a lowercase RFC 1123 host label" }).describe("Short host name; also the system hostname."),
  })
  .describe("Which host this is.");

export const OsSchema = z
  .strictObject({
    id: z.string().regex(OS_ID_RE).describe("Expected `ID` from /etc/os-release, e.g. `ubuntu`."),
    min_version: z.string().regex(OS_VERSION_RE).describe("Lowest accepted `VERSION_ID`, e.g. `24.04`."),
  })
  .describe("Expected operating system; preflight refuses any other.");

export const HubSchema = z
  .strictObject({
    url: HttpUrl.describe("Base URL of the hub's bootstrap routes for this host."),
    events_url: HttpUrl.describe("Where bootstrap.py POSTs batches of progress events."),
    secrets_url: HttpUrl.describe("Base URL for secrets: `<secrets_url>/<name>` answers with the secret (token required)."),
  })
  .describe("The hub this host reports to. The bootstrap token is not here: it lives in `<bootstrap_dir>/bootstrap-token` (mode 0600).");

export const ArtifactSchema = z
  .strictObject({
    url: HttpUrl.describe("Download URL of the bundle (a .tar.xz, .tar.zst or .tar.gz)."),
    sha256: Sha256.nullable()
      .default(null)
      .describe("Expected sha256 of the download; null means fetch `<url>.sha256`. Never installed unverified."),
    version: z.string().regex(VERSION_RE).describe("Version; installed at `bundles/<artifact>/<version>`."),
    size_bytes: NonNegInt(Number.MAX_SAFE_INTEGER).nullable().default(null).describe("Expected size in bytes, when known (progress and sanity check)."),
    strip_components: NonNegInt(8).default(0).describe("Leading path components to strip when extracting."),
    expected_files: z.array(RelPath).max(64).default([]).describe("Files that must exist after extraction (relative to the bundle root)."),
    executables: z.array(RelPath).max(64).default([]).describe("Files that must exist and be executable after extraction."),
  })
  .describe("One software bundle for this host's arch.");

export const ArtifactsSchema = z
  .strictObject({
    project_host: ArtifactSchema.describe("The project-host daemon bundle."),
    project: ArtifactSchema.describe("The project bundle."),
    tools: ArtifactSchema.describe("The tools bundle (arch-specific)."),
  })
  .describe("The three bundles, already selected for this host's arch.");

export const NvmSchema = z
  .strictObject({
    version: z.string().regex(VERSION_RE).describe("nvm release, e.g. `0.40.1`."),
    url: HttpUrl.describe("URL of nvm's `nvm.sh` for that release."),
    sha256: Sha256.describe("sha256 of that `nvm.sh` (pinned; required)."),
  })
  .describe("Optional pinned copy of nvm itself, installed as `~/.nvm/nvm.sh`.");

export const NodeSchema = z
  .strictObject({
    version: z.string().regex(NODE_VERSION_RE, { message: "must be x.y.z" }).describe("Node.js version, e.g. `20.18.1`."),
    dist_url: HttpUrl.describe("Node dist mirror base; the release is at `<dist_url>/v<version>/` with SHASUMS256.txt."),
    nvm: NvmSchema.nullable().default(null).describe("Optional pinned nvm (`~/.nvm/nvm.sh`); null installs Node.js in nvm's layout without nvm itself."),
  })
  .describe("Node.js, installed in nvm's layout under `<home>/.nvm`.");

export const AptSchema = z
  .strictObject({
    packages: z.array(z.string().regex(DEB_PACKAGE_RE)).max(200).default([]).describe("Debian packages to install."),
    lists_max_age_s: NonNegInt(7 * 86400).default(3600).describe("Skip `apt-get update` when the lists are younger than this."),
    lock_timeout_s: PosInt(3600).default(600).describe("How long to wait for the dpkg/apt locks."),
  })
  .describe("System packages.");

export const DataDiskSchema = z
  .strictObject({
    candidates: z.array(AbsPath).min(1).max(16).describe("Block devices to use, in order of preference (e.g. /dev/disk/by-id/...)."),
    min_size_gb: PosInt(1 << 20).describe("Refuse a disk smaller than this."),
    wait_s: NonNegInt(3600).default(600).describe("How long to wait for a usable candidate (upstream: 600 s)."),
  })
  .describe("A dedicated data disk for /btrfs. Never reformats a disk that holds another filesystem.");

export const BtrfsSchema = z
  .strictObject({
    mount_point: AbsPath.default("/btrfs").describe("Where the btrfs filesystem is mounted."),
    image_path: AbsPath.describe("Sparse loop image used when there is no data disk."),
    image_size_gb: PosInt(1 << 20).describe("Size of the sparse loop image."),
    data_disk: DataDiskSchema.nullable().default(null).describe("A dedicated data disk for /btrfs; null uses the sparse loop image."),
  })
  .describe("The btrfs filesystem for projects.");

export const ServiceSchema = z
  .strictObject({
    unit: z.string().regex(SYSTEMD_UNIT_RE).default("cocalc-project-host").describe("systemd unit name (without .service)."),
    exec: RelPath.describe("Daemon executable, relative to the project_host bundle root."),
    health_url: HttpUrl.describe("URL polled until it answers 2xx."),
    health_timeout_s: PosInt(3600).default(120).describe("Deadline for the health check."),
    args: z
      .array(z.string().min(1).max(4096).refine((v) => !/[\n\0]/.test(v), { message: "must not contain newlines or NUL" }))
      .max(32)
      .default([])
      .describe("Arguments after the executable (the real daemon runs in the foreground with none)."),
  })
  .describe("The project-host daemon.");

export const TunnelSchema = z
  .strictObject({
    host: z.string().min(1).max(253).regex(/^[A-Za-z0-9.-]+$/).describe("SSH server the reverse tunnel goes to."),
    port: PosInt(65535).default(22).describe("SSH port."),
    user: z.string().regex(USER_RE).describe("SSH user on that server."),
    remote_port: PosInt(65535).describe("Port forwarded back to this host."),
    local_port: PosInt(65535).describe("Local port exposed through the tunnel."),
  })
  .describe("Optional reverse SSH tunnel (managed by the connector).");

/** What the daemon's environment (UPSTREAM §13) needs beyond the rest of the config. */
export const DaemonSchema = z
  .strictObject({
    region: z.string().regex(REGION_RE).default("").describe("PROJECT_HOST_REGION."),
    public_url: HttpUrl.nullable().default(null).describe("PROJECT_HOST_PUBLIC_URL; null: https://<public_ip>."),
    internal_url: HttpUrl.nullable().default(null).describe("PROJECT_HOST_INTERNAL_URL; null: the public URL."),
    public_ip: z.string().regex(IP_RE).nullable().default(null).describe("The host's public IP; the hub fills it from the caller's address when it does not know it."),
    ssh_server: z.string().regex(HOST_PORT_RE).nullable().default(null).describe("PROJECT_HOST_SSH_SERVER; null: <public_ip>:2222."),
    https_hostname: z.string().min(1).max(253).regex(DNS_NAME_RE).nullable().default(null).describe("COCALC_PROJECT_HOST_HTTPS_HOSTNAME (when https)."),
    software_base_url: HttpUrl.nullable().default(null).describe("COCALC_PROJECT_HOST_SOFTWARE_BASE_URL: where the daemon finds bundle upgrades."),
    port: PosInt(65535).default(443).describe("PORT the daemon listens on (HOST=0.0.0.0)."),
    https: z.boolean().default(true).describe("COCALC_PROJECT_HOST_HTTPS: the daemon terminates TLS itself."),
  })
  .describe("Values for the daemon's environment file (/etc/cocalc/project-host.env).");

/** cloudflared for a host reached through a Cloudflare tunnel (UPSTREAM 16), pinned and verified. */
export const CloudflaredSchema = z
  .strictObject({
    deb: z
      .strictObject({
        url: HttpUrl.describe("The cloudflared .deb for this host's arch (a fourth artifact, from its manifest)."),
        sha256: Sha256.describe("Its sha256 (required: never an unverified 'latest')."),
        version: z.string().regex(VERSION_RE).describe("The package version dpkg reports once installed."),
        size_bytes: NonNegInt(Number.MAX_SAFE_INTEGER).nullable().default(null).describe("Expected size, when known."),
      })
      .describe("The cloudflared package."),
    hostname: z.string().min(1).max(253).regex(DNS_NAME_RE).describe("The tunnel's public host name (PROJECT_HOST_PUBLIC_URL https://<it>)."),
    port: PosInt(65535).default(9002).describe("The daemon's port behind the tunnel (ingress http://localhost:<port>)."),
    token_secret: z.string().regex(SECRET_NAME_RE).default("cloudflared-token").describe("Name of the hub secret holding the tunnel token."),
  })
  .describe("A Cloudflare tunnel to the daemon; null for none.");

/** NVIDIA's container toolkit for GPU hosts (UPSTREAM 4): an apt repository with a pinned keyring. */
export const GpuSchema = z
  .strictObject({
    repo_url: HttpUrl.describe("The toolkit's apt repository (a flat repository: `deb [signed-by=…] <repo_url> /`)."),
    keyring_url: HttpUrl.describe("Its signing key (binary .gpg keyring)."),
    keyring_sha256: Sha256.describe("The keyring's sha256 (pinned)."),
    packages: z.array(z.string().regex(DEB_PACKAGE_RE)).min(1).max(16).default(["nvidia-container-toolkit"]).describe("Packages from that repository."),
    cdi_interval_s: PosInt(86400).default(300).describe("How often a systemd timer regenerates the CDI spec (it goes stale after driver changes)."),
  })
  .describe("GPU support; null for none. Skipped, with a message, on a host without an NVIDIA GPU.");

/** The daemon section when the config leaves it out (zod 4 takes an object default as is). */
export const DEFAULT_DAEMON = Object.freeze({
  region: "",
  public_url: null,
  internal_url: null,
  public_ip: null,
  ssh_server: null,
  https_hostname: null,
  software_base_url: null,
  port: 443,
  https: true,
});

const EnvVars = z
  .record(z.string().regex(ENV_NAME_RE), z.string().max(4096).refine((v) => !/[\n\0]/.test(v), { message: "must not contain newlines or NUL" }))
  .default({})
  .describe("Extra non-secret variables for /etc/cocalc/project-host.env.");

// --- the whole config ----------------------------------------------------------

function isInside(child: string, parent: string): boolean {
  return parent === "/" ? child !== "/" : child.startsWith(parent + "/");
}

export const BootstrapConfigSchema = z
  .strictObject({
    schema_version: z.literal(SCHEMA_VERSION).describe("Version of this schema."),
    host: HostSchema,
    bootstrap_user: z
      .string()
      .regex(USER_RE, { message: "must be a POSIX user name" })
      .refine((u) => u !== "root", { message: "must not be root: the bootstrap runs as a non-root user with sudo" })
      .describe("Non-root user that runs the bootstrap and the daemon."),
    home: AbsPath.describe("That user's home directory (preflight checks it against getent passwd)."),
    bootstrap_root: AbsPath.describe("Root of everything the bootstrap owns, e.g. `/home/ubuntu/cocalc-host`."),
    bootstrap_dir: AbsPath.describe("Where the stub, config, token, state and logs of the bootstrap live; inside bootstrap_root."),
    arch: z.enum(ARCHES).describe("Expected CPU architecture (Debian naming)."),
    os: OsSchema,
    parallel: z.boolean().default(true).describe("Run independent steps concurrently; false walks the same graph serially."),
    hub: HubSchema,
    conat_urls: z.array(HttpUrl).min(1).max(8).describe("Conat server URLs the daemon connects to; reachability is checked."),
    secrets: z.array(z.string().regex(SECRET_NAME_RE)).max(16).default([]).describe("Secrets to fetch into 0600 files under `<bootstrap_root>/config/secrets/`."),
    artifacts: ArtifactsSchema,
    node: NodeSchema,
    apt: AptSchema,
    btrfs: BtrfsSchema,
    service: ServiceSchema,
    tunnel: TunnelSchema.nullable().default(null).describe("Optional reverse SSH tunnel (managed by the connector); null for none."),
    daemon: DaemonSchema.default({ ...DEFAULT_DAEMON }),
    cloudflared: CloudflaredSchema.nullable().default(null).describe("A Cloudflare tunnel to the daemon; null for none."),
    gpu: GpuSchema.nullable().default(null).describe("NVIDIA container toolkit for GPU hosts; null for none."),
    env: EnvVars,
  })
  .superRefine((c, ctx) => {
    if (!isInside(c.bootstrap_dir, c.bootstrap_root)) {
      ctx.addIssue({ code: "custom", path: ["bootstrap_dir"], message: "must be inside bootstrap_root", input: c.bootstrap_dir });
    }
    if (!isInside(c.bootstrap_root, c.home)) {
      ctx.addIssue({ code: "custom", path: ["bootstrap_root"], message: "must be inside home", input: c.bootstrap_root });
    }
  })
  .describe("CoCalc project-host bootstrap config, read by bootstrap.py.");

export type BootstrapConfigInput = z.input<typeof BootstrapConfigSchema>;
export type BootstrapConfig = z.output<typeof BootstrapConfigSchema>;
export type ArtifactSpec = z.output<typeof ArtifactSchema>;

/** The fixed name of the token file inside bootstrap_dir (mode 0600). */
export const TOKEN_FILE_NAME = "bootstrap-token";
/** The fixed name of the config file inside bootstrap_dir. */
export const CONFIG_FILE_NAME = "bootstrap-config.json";

/** One reported problem: JSON path (as an array) and message. */
export interface ConfigIssue {
  path: (string | number)[];
  message: string;
}

/** Validate without throwing; every issue with its JSON path. */
export function checkConfig(
  input: unknown,
): { ok: true; config: BootstrapConfig } | { ok: false; issues: ConfigIssue[] } {
  const r = BootstrapConfigSchema.safeParse(input);
  if (r.success) return { ok: true, config: r.data };
  return {
    ok: false,
    issues: r.error.issues.map((i) => ({ path: i.path.map((p) => (typeof p === "symbol" ? String(p) : p)), message: i.message })),
  };
}

/** `$.a.b[0]` style rendering of a path, as bootstrap.py prints it. */
export function formatPath(path: readonly (string | number)[]): string {
  let s = "$";
  for (const p of path) s += typeof p === "number" ? `[${p}]` : `.${p}`;
  return s;
}
