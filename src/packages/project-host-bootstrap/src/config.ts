/**
 * The bootstrap config: one JSON document that tells bootstrap.py everything
 * about the host it turns into a project host.
 *
 * This zod schema is the single source of truth. The JSON Schema in
 * `schema/bootstrap-config.schema.json` is generated from it (input side),
 * and `python/bootstrap.py` re-implements exactly these rules (config.py: one
 * declaration per field, its checks in the type); the vectors in
 * `fixtures/configs/` prove that both agree on every verdict and every error
 * path, and two differential fuzzers (test/config-fuzz.test.ts,
 * python/tests/test_config_fuzz.py) look for configs on which they do not.
 *
 * Rules that bootstrap.py must mirror are kept deliberately simple: regexes,
 * integer ranges, absolute/relative paths, and a handful of cross-field
 * checks in `BootstrapConfigSchema`'s refinements.
 */
import { UUID_PATTERN } from "@cocalc/util";
import { z } from "zod/v4";

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
/**
 * A Debian package name as policy allows it (a-z, 0-9, `.`, `+`, `-`; two or more
 * characters, the first a letter or digit) that does not end in `-`: apt-get reads
 * `name-` as "remove name". A trailing `+` ("install") stays allowed: `g++` is a
 * real package, and installing is what the list asks for anyway.
 */
export const DEB_PACKAGE_RE = /^[a-z0-9][a-z0-9.+-]*[a-z0-9.+]$/;
export const ENV_NAME_RE = /^[A-Z_][A-Z0-9_]*$/;
export const SECRET_NAME_RE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
export const OS_ID_RE = /^[a-z0-9._-]+$/;
export const OS_VERSION_RE = /^[0-9]+(\.[0-9]+)*$/;
/** Our own unit namespace: `cocalc-` and a plain name, so it can never name a system unit (or a template). */
export const SYSTEMD_UNIT_RE = /^cocalc-[A-Za-z0-9_.-]{1,200}$/;
/**
 * What no string that reaches a file, a unit or a shell may contain: C0 and C1
 * control characters, DEL, the Unicode line and paragraph separators (Python's
 * splitlines() breaks lines there), and unpaired surrogates (not encodable as
 * UTF-8). With the u flag, a surrogate pair is one code point outside this class.
 */
// biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is the point
export const UNSAFE_CHAR_RE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\ud800-\udfff]/u;
/** Deepest JSON nesting a config may have (it needs 5); deeper input is refused as a whole, at `$`. */
export const MAX_JSON_DEPTH = 32;
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

const SAFE_TEXT_MESSAGE = "must not contain control characters (U+0000-U+001F, U+007F-U+009F, U+2028, U+2029) or unpaired surrogates";
const isSafeText = (s: string) => !UNSAFE_CHAR_RE.test(s);

/**
 * Directories no host-level path of ours may be: the root, the top-level system
 * directories, and anything inside the ones the system owns outright.
 */
export const SYSTEM_DIRS = [
  "/",
  "/bin",
  "/boot",
  "/dev",
  "/etc",
  "/home",
  "/lib",
  "/lib32",
  "/lib64",
  "/libx32",
  "/media",
  "/mnt",
  "/opt",
  "/proc",
  "/root",
  "/run",
  "/sbin",
  "/snap",
  "/srv",
  "/sys",
  "/tmp",
  "/usr",
  "/var",
  "/var/backups",
  "/var/cache",
  "/var/lib",
  "/var/local",
  "/var/log",
  "/var/mail",
  "/var/opt",
  "/var/spool",
  "/var/tmp",
] as const;
export const SYSTEM_TREES = ["/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin", "/sys", "/usr"] as const;

export function isSystemPath(p: string): boolean {
  return (SYSTEM_DIRS as readonly string[]).includes(p) || SYSTEM_TREES.some((t) => isInside(p, t));
}

/** An absolute, normalised POSIX path: no `.`/`..` segments, no NUL. */
export const AbsPath = z
  .string()
  .min(1)
  .max(MAX_PATH)
  .refine(isSafeText, { message: SAFE_TEXT_MESSAGE })
  .refine((p) => p.startsWith("/") && !p.includes("//") && (p === "/" || !p.endsWith("/")) && pathSegments(p).every((s) => s !== "." && s !== ".."), {
    message: "must be an absolute, normalised path (starts with /, no . or .. segments, no // and no trailing /)",
  });

/** A relative path inside a bundle: no leading `/`, no `.`/`..` segments. */
export const RelPath = z
  .string()
  .min(1)
  .max(MAX_PATH)
  .refine(isSafeText, { message: SAFE_TEXT_MESSAGE })
  .refine((p) => !p.startsWith("/") && !p.includes("//") && !p.endsWith("/") && pathSegments(p).every((s) => s !== "." && s !== ".."), {
    message: "must be a relative path inside the bundle (no leading /, no . or .. segments)",
  });

/**
 * http(s) URL, in one plain form simple enough that bootstrap.py implements it
 * identically (`is_http_url`), and that Node's URL, urllib and curl all read the
 * same way: lower-case `http://` or `https://`; a host that is an ASCII host name
 * (internationalized names in their punycode form, `xn--`), a dotted-quad IPv4
 * address or a bracketed IPv6 address; an optional port 0-65535; then nothing, or
 * `/`, `?` or `#` and URL characters only (RFC 3986: no spaces, no non-ASCII,
 * no backslash, `%` only as an escape). No userinfo. Plain http is allowed for
 * local mirrors and tests.
 */
export const HttpUrl = z.string().max(2048).refine(isHttpUrl, {
  message: "must be an http:// or https:// URL in plain ASCII (a host name, IPv4 or [IPv6] host; internationalized names as punycode, xn--)",
});

/** A host name label; the last label starts with a letter (so it is never read as a number). */
const HOST_LABEL = "[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
const TOP_LABEL = "[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
export const DNS_NAME_RE = new RegExp(`^(?:${HOST_LABEL}\\.)*${TOP_LABEL}\\.?$`);
export const IPV4_RE = /^(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$/;
/** scheme, authority (up to the first / ? # or the end), the rest. */
export const URL_PARTS_RE = /^https?:\/\/([^/?#]*)([/?#].*)?$/s;
/** What may follow the authority: RFC 3986's URL characters, `%` only before two hex digits. */
export const URL_REST_RE = /^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#]|%[0-9A-Fa-f]{2})*$/;

/** An ASCII host name (at most 253 characters) or a dotted-quad IPv4 address. */
export function isHostName(host: string): boolean {
  return (host.length <= 253 && DNS_NAME_RE.test(host)) || IPV4_RE.test(host);
}

/** An IPv6 address as RFC 4291 writes it (hex groups, one `::`, an IPv4 tail at the very end); no zone. */
export function isIPv6(text: string): boolean {
  if (!/^[0-9A-Fa-f:.]+$/.test(text)) return false;
  const halves = text.split("::");
  if (halves.length > 2) return false;
  const groups = halves.flatMap((h) => (h === "" ? [] : h.split(":")));
  let count = 0;
  for (const [i, g] of groups.entries()) {
    if (i === groups.length - 1 && g.includes(".") && !text.endsWith(":")) {
      if (!IPV4_RE.test(g)) return false;
      count += 2;
    } else if (/^[0-9A-Fa-f]{1,4}$/.test(g)) count += 1;
    else return false;
  }
  return halves.length === 2 ? count <= 7 : count === 8;
}

export function isHttpUrl(s: string): boolean {
  const m = URL_PARTS_RE.exec(s);
  if (!m) return false;
  const authority = m[1]!;
  const rest = m[2] ?? "";
  const hp = /^(\[[^\]]*\]|[^:]*)(?::([0-9]{1,5}))?$/.exec(authority);
  if (!hp || (hp[2] !== undefined && Number(hp[2]) > 65535)) return false;
  const host = hp[1]!;
  const hostOk = host.startsWith("[") ? isIPv6(host.slice(1, -1)) : isHostName(host);
  return hostOk && URL_REST_RE.test(rest);
}

export const Sha256 = z.string().regex(SHA256_RE, { message: "must be 64 lowercase hex digits (a sha256)" });

/**
 * An array of at most `max` (and at least `min`) items. One over-long array
 * fails as a whole before any item is checked, and the failure is fatal (the
 * cross-field checks do not run), as bootstrap.py does. zod 4 does so for
 * `.max()` itself; zod 3.25's `zod/v4` checks every item first and goes on,
 * so the length is checked here, with zod's own issue and message, before
 * the items. (Typed as the plain array: the check changes no type, and the
 * JSON Schema shows the array with its bounds.)
 */
function BoundedArray<T extends z.ZodType>(item: T, bounds: { min?: number; max: number }): z.ZodArray<T> {
  const lengthOnly = z.array(z.unknown()).max(bounds.max);
  let array = z.array(item).max(bounds.max);
  if (bounds.min !== undefined) array = array.min(bounds.min);
  return z.preprocess((value, ctx) => {
    if (Array.isArray(value) && value.length > bounds.max) {
      // zod's own message for the length, whichever zod this is
      const message = lengthOnly.safeParse(value).error?.issues[0]?.message ?? `must have at most ${bounds.max} items`;
      ctx.addIssue({ code: "too_big", origin: "array", maximum: bounds.max, inclusive: true, input: value, message, continue: false });
    }
    return value;
  }, array) as unknown as z.ZodArray<T>;
}

/**
 * When the cross-field checks run: only if every issue so far leaves the
 * values in place (continue), an unknown key included; zod 4 and zod 3.25's
 * `zod/v4` differ on the latter, so the rule is spelled out here.
 */
function crossFieldChecksRun(payload: { issues: readonly { code?: string; continue?: boolean }[] }): boolean {
  return payload.issues.every((i) => i.continue === true || i.code === "unrecognized_keys");
}

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

/**
 * A read-only squashfs (zstd) image of the same bundle: mounted instead of
 * extracted when the host's kernel supports it (bootstrap.py decides: only the
 * host knows its kernel). Its root is the bundle root (no strip_components).
 */
export const ImageSchema = z
  .strictObject({
    url: HttpUrl.describe("Download URL of the image (a .sqfs)."),
    sha256: Sha256.describe("sha256 of the image; required: an image is never mounted unverified."),
    size_bytes: NonNegInt(Number.MAX_SAFE_INTEGER).nullable().default(null).describe("Expected size in bytes, when known."),
  })
  .describe("A squashfs image of the bundle, mounted read-only instead of extracting the archive.");

export const ArtifactSchema = z
  .strictObject({
    url: HttpUrl.describe("Download URL of the bundle (a .tar.xz, .tar.zst or .tar.gz)."),
    sha256: Sha256.nullable().default(null).describe("Expected sha256 of the download; null means fetch `<url>.sha256`. Never installed unverified."),
    version: z.string().regex(VERSION_RE).describe("Version; installed at `bundles/<artifact>/<version>`."),
    size_bytes: NonNegInt(Number.MAX_SAFE_INTEGER).nullable().default(null).describe("Expected size in bytes, when known (progress and sanity check)."),
    strip_components: NonNegInt(8).default(0).describe("Leading path components to strip when extracting."),
    expected_files: BoundedArray(RelPath, { max: 64 }).default([]).describe("Files that must exist after extraction (relative to the bundle root)."),
    executables: BoundedArray(RelPath, { max: 64 }).default([]).describe("Files that must exist and be executable after extraction."),
    image: ImageSchema.nullable().default(null).describe("The same bundle as a squashfs image; null: archive only."),
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
    packages: BoundedArray(
      z.string().regex(DEB_PACKAGE_RE, {
        message: "must be a Debian package name (a-z 0-9 . + -, 2 or more, starting with a letter or digit) not ending in - (apt-get would remove the package)",
      }),
      { max: 200 },
    )
      .default([])
      .describe("Debian packages to install (names only: no version, release or trailing -)."),
    lists_max_age_s: NonNegInt(7 * 86400)
      .default(3600)
      .describe("Skip `apt-get update` when the lists are younger than this."),
    lock_timeout_s: PosInt(3600).default(600).describe("How long to wait for the dpkg/apt locks."),
  })
  .describe("System packages.");

export const DataDiskSchema = z
  .strictObject({
    candidates: BoundedArray(AbsPath, { min: 1, max: 16 }).describe("Block devices to use, in order of preference (e.g. /dev/disk/by-id/...)."),
    min_size_gb: PosInt(1 << 20).describe("Refuse a disk smaller than this."),
    wait_s: NonNegInt(3600).default(600).describe("How long to wait for a usable candidate (upstream: 600 s)."),
  })
  .describe("A dedicated data disk for /btrfs. Never reformats a disk that holds another filesystem.");

export const BtrfsSchema = z
  .strictObject({
    mount_point: AbsPath.refine((p) => !isSystemPath(p), { message: "must not be / or a system directory (e.g. /btrfs)" })
      .default("/btrfs")
      .describe("Where the btrfs filesystem is mounted; not / or a system directory, not home or above it."),
    image_path: AbsPath.describe("Sparse loop image used when there is no data disk; inside bootstrap_root, outside bootstrap_dir."),
    image_size_gb: PosInt(1 << 20).describe("Size of the sparse loop image."),
    data_disk: DataDiskSchema.nullable().default(null).describe("A dedicated data disk for /btrfs; null uses the sparse loop image."),
  })
  .describe("The btrfs filesystem for projects.");

export const ServiceSchema = z
  .strictObject({
    unit: z
      .string()
      .regex(SYSTEMD_UNIT_RE, { message: "must be cocalc- and a plain name (letters, digits, _ . -): our own unit namespace" })
      .default("cocalc-project-host")
      .describe("systemd unit name (without .service), in our namespace: `cocalc-...`."),
    exec: RelPath.describe("Daemon executable, relative to the project_host bundle root."),
    health_url: HttpUrl.describe("URL polled until it answers 2xx."),
    health_timeout_s: PosInt(3600).default(120).describe("Deadline for the health check."),
    args: z
      .array(
        z
          .string()
          .min(1)
          .max(4096)
          .refine((v) => !/[\n\0]/.test(v), { message: "must not contain newlines or NUL" }),
      )
      .max(32)
      .default([])
      .describe("Arguments after the executable (the real daemon runs in the foreground with none)."),
  })
  .describe("The project-host daemon.");

export const TunnelSchema = z
  .strictObject({
    host: z
      .string()
      .refine(isHostName, { message: "must be a host name or IPv4 address in ASCII (internationalized names as punycode, xn--)" })
      .describe("SSH server the reverse tunnel goes to."),
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
    public_ip: z
      .string()
      .regex(IP_RE)
      .nullable()
      .default(null)
      .describe("The host's public IP; the hub fills it from the caller's address when it does not know it."),
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
  .record(z.string().regex(ENV_NAME_RE), z.string().max(4096).refine(isSafeText, { message: SAFE_TEXT_MESSAGE }))
  .default({})
  .describe("Extra non-secret variables for /etc/cocalc/project-host.env.");

// --- the whole config ----------------------------------------------------------

export function isInside(child: string, parent: string): boolean {
  return parent === "/" ? child !== "/" : child.startsWith(`${parent}/`);
}

/** The loop image must be a file bootstrap.py owns: inside bootstrap_root, outside bootstrap_dir. */
function imageOutsideOurRoot(c: { bootstrap_root: string; bootstrap_dir: string; btrfs: { image_path: string } }): boolean {
  const image = c.btrfs.image_path;
  return !isInside(image, c.bootstrap_root) || image === c.bootstrap_dir || isInside(image, c.bootstrap_dir);
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
    home: AbsPath.refine((p) => !isSystemPath(p), { message: "must be a real home directory, not / or a system directory (e.g. /home/<user>)" }).describe(
      "That user's home directory (preflight checks it against getent passwd); not / or a system directory.",
    ),
    bootstrap_root: AbsPath.describe("Root of everything the bootstrap owns, e.g. `/home/ubuntu/cocalc-host`."),
    bootstrap_dir: AbsPath.describe("Where the stub, config, token, state and logs of the bootstrap live; inside bootstrap_root."),
    arch: z.enum(ARCHES).describe("Expected CPU architecture (Debian naming)."),
    os: OsSchema,
    parallel: z.boolean().default(true).describe("Run independent steps concurrently; false walks the same graph serially."),
    cpu_slots: PosInt(256)
      .nullable()
      .default(null)
      .describe("How many CPU-heavy jobs (decompressing and extracting archives) run at once, the biggest first; null: one per core."),
    hub: HubSchema,
    conat_urls: BoundedArray(HttpUrl, { min: 1, max: 8 }).describe("Conat server URLs the daemon connects to; reachability is checked."),
    secrets: BoundedArray(z.string().regex(SECRET_NAME_RE), { max: 16 })
      .default([])
      .describe("Secrets to fetch into 0600 files under `<bootstrap_root>/config/secrets/`."),
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
  .refine((c) => isInside(c.bootstrap_dir, c.bootstrap_root), {
    path: ["bootstrap_dir"],
    message: "must be inside bootstrap_root",
    when: crossFieldChecksRun,
  })
  .refine((c) => isInside(c.bootstrap_root, c.home), { path: ["bootstrap_root"], message: "must be inside home", when: crossFieldChecksRun })
  .refine((c) => !imageOutsideOurRoot(c), {
    path: ["btrfs", "image_path"],
    message: "must be inside bootstrap_root and outside bootstrap_dir (a file bootstrap.py owns)",
    when: crossFieldChecksRun,
  })
  .refine((c) => imageOutsideOurRoot(c) || !isInside(c.btrfs.image_path, c.btrfs.mount_point), {
    path: ["btrfs", "image_path"],
    message: "must not be inside btrfs.mount_point",
    when: crossFieldChecksRun,
  })
  .refine((c) => !(c.btrfs.mount_point === c.home || isInside(c.home, c.btrfs.mount_point)), {
    path: ["btrfs", "mount_point"],
    message: "must not be home or above it (it would hide home)",
    when: crossFieldChecksRun,
  })
  .describe("CoCalc project-host bootstrap config, read by bootstrap.py.");

export type BootstrapConfigInput = z.input<typeof BootstrapConfigSchema>;
export type BootstrapConfig = z.output<typeof BootstrapConfigSchema>;
export type ArtifactSpec = z.output<typeof ArtifactSchema>;
export type ImageSpec = z.output<typeof ImageSchema>;

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
export function checkConfig(input: unknown): { ok: true; config: BootstrapConfig } | { ok: false; issues: ConfigIssue[] } {
  if (jsonDepth(input) > MAX_JSON_DEPTH) return { ok: false, issues: [{ path: [], message: DEPTH_MESSAGE }] };
  const r = BootstrapConfigSchema.safeParse(input);
  if (r.success) return { ok: true, config: r.data };
  return {
    ok: false,
    issues: r.error.issues.map((i) => ({ path: i.path.map((p) => (typeof p === "symbol" ? String(p) : p)), message: i.message })),
  };
}

const DEPTH_MESSAGE = `is nested more than ${MAX_JSON_DEPTH} levels deep`;

/** Nesting depth of a JSON value (a scalar is 0, `[]` and `{}` are 1), counted without recursion, stopping past the limit. */
export function jsonDepth(value: unknown, limit = MAX_JSON_DEPTH): number {
  let deepest = 0;
  const stack: [unknown, number][] = [[value, 0]];
  while (stack.length > 0) {
    const [v, depth] = stack.pop()!;
    if (v === null || typeof v !== "object") continue;
    deepest = Math.max(deepest, depth + 1);
    if (deepest > limit) return deepest;
    for (const child of Array.isArray(v) ? v : Object.values(v)) stack.push([child, depth + 1]);
  }
  return deepest;
}

/** `$.a.b[0]` style rendering of a path, as bootstrap.py prints it. */
export function formatPath(path: readonly (string | number)[]): string {
  let s = "$";
  for (const p of path) s += typeof p === "number" ? `[${p}]` : `.${p}`;
  return s;
}
