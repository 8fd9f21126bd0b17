/**
 * Artifact manifests: `<base>/<artifact>/latest-<os>-<arch>.json`, published
 * next to each bundle build:
 *
 *   { "url": "https://…/project-host/1.4.2/project-host-linux-amd64.tar.xz",
 *     "sha256": "<64 hex>", "size_bytes": 123, "built_at": "2025-01-01T00:00:00Z",
 *     "os": "linux", "arch": "amd64", "version": "1.4.2" }
 *
 * An optional `image` entry names the same bundle as a read-only squashfs
 * image (`{ "url", "sha256", "size_bytes" }`, made from the archive by
 * `pnpm bundle-image`); it goes into the config beside the archive and the
 * host mounts it when its kernel can (bootstrap.py probes; only the host
 * knows its kernel), else extracts the archive.
 *
 * `version` is optional: without it the version is the path segment after
 * `/<artifact>/` in `url`. A manifest that does not validate, names another
 * os or arch, or has no usable sha256 is refused with an error naming its URL
 * (never installed unverified). Fetched with a timeout; good manifests are
 * cached briefly, failures never.
 */
import { ARCHES, type Arch, type ArtifactName, HttpUrl } from "@cocalc/project-host-bootstrap";
import { SHA256_RE, VERSION_RE } from "@cocalc/project-host-bootstrap/contract";
import { z } from "zod/v4";

/** URL path segment of each bundle under the software base URL. */
/** The three bundles, and cloudflared's .deb (for hosts reached through a Cloudflare tunnel). */
export type HubArtifactName = ArtifactName | "cloudflared";

export const ARTIFACT_PATHS: Readonly<Record<HubArtifactName, string>> = {
  project_host: "project-host",
  project: "project",
  tools: "tools",
  cloudflared: "cloudflared",
};

export const DEFAULT_MANIFEST_TIMEOUT_MS = 10_000;
export const DEFAULT_MANIFEST_TTL_MS = 60_000;
const MAX_MANIFEST_BYTES = 64 * 1024;

// Names other build systems use for the same machines.
const ARCH_ALIASES: Record<string, Arch> = { amd64: "amd64", x86_64: "amd64", x64: "amd64", arm64: "arm64", aarch64: "arm64" };

const ManifestSha256 = z
  .string({ error: (iss) => (iss.input === undefined ? "missing: a manifest without a sha256 is never installed" : "must be a string") })
  .transform((s) => s.trim().toLowerCase())
  .refine((s) => SHA256_RE.test(s), { message: "is not a sha256 (64 hex digits)" });

export const ManifestImageSchema = z.looseObject({ url: HttpUrl, sha256: ManifestSha256, size_bytes: z.int().min(0) });

export const ManifestSchema = z.looseObject({
  url: HttpUrl,
  sha256: ManifestSha256,
  size_bytes: z.int().min(0),
  image: ManifestImageSchema.optional(),
  built_at: z.string().refine((s) => !Number.isNaN(Date.parse(s)), { message: "must be an ISO 8601 date" }),
  os: z.string().min(1).max(32),
  arch: z.string().min(1).max(32),
  version: z.string().regex(VERSION_RE).optional(),
});
export type Manifest = z.output<typeof ManifestSchema>;

/** What one manifest contributes to the config's `artifacts.<name>`. */
export interface ResolvedArtifact {
  url: string;
  sha256: string;
  version: string;
  size_bytes: number;
  built_at: string;
  manifest_url: string;
  /** The same bundle as a squashfs image, when the manifest names one. */
  image: { url: string; sha256: string; size_bytes: number } | null;
}

export class ManifestError extends Error {
  override readonly name = "ManifestError";
  constructor(
    readonly manifestUrl: string,
    reason: string,
  ) {
    super(`artifact manifest ${manifestUrl}: ${reason}`);
  }
}

export function manifestUrl(baseUrl: string, artifact: HubArtifactName, os: string, arch: Arch): string {
  return `${baseUrl.replace(/\/+$/, "")}/${ARTIFACT_PATHS[artifact]}/latest-${os}-${arch}.json`;
}

/** The `<version>` in `…/<artifact>/<version>/…` of a bundle URL, if there is one. */
export function versionFromUrl(url: string, artifact: HubArtifactName): string | null {
  const segments = new URL(url).pathname.split("/").map(decodeURIComponent);
  const i = segments.lastIndexOf(ARTIFACT_PATHS[artifact]);
  const candidate = i >= 0 && i + 2 < segments.length ? segments[i + 1]! : null;
  // a version has a digit: `…/cloudflared/releases/latest/…` names none
  return candidate !== null && VERSION_RE.test(candidate) && /[0-9]/.test(candidate) ? candidate : null;
}

/** Check a parsed manifest body against what was asked for. */
export function resolveManifest(body: unknown, want: { url: string; artifact: HubArtifactName; os: string; arch: Arch }): ResolvedArtifact {
  const r = ManifestSchema.safeParse(body);
  if (!r.success) {
    throw new ManifestError(want.url, r.error.issues.map((i) => `${i.path.join(".") || "(body)"} ${i.message}`).join("; "));
  }
  const m = r.data;
  if (new URL(m.url).pathname.split("/").includes("latest")) {
    throw new ManifestError(want.url, `url ${m.url} names "latest", which changes under its checksum: artifacts are immutable, versioned URLs`);
  }
  if (m.os !== want.os) throw new ManifestError(want.url, `is for os ${JSON.stringify(m.os)}, not ${JSON.stringify(want.os)}`);
  if (ARCH_ALIASES[m.arch] !== want.arch) throw new ManifestError(want.url, `is for arch ${JSON.stringify(m.arch)}, not ${JSON.stringify(want.arch)}`);
  const version = m.version ?? versionFromUrl(m.url, want.artifact);
  if (version === null) {
    throw new ManifestError(want.url, `has no version field and its url has no /${ARTIFACT_PATHS[want.artifact]}/<version>/ segment`);
  }
  const image = m.image ? { url: m.image.url, sha256: m.image.sha256, size_bytes: m.image.size_bytes } : null;
  return { url: m.url, sha256: m.sha256, version, size_bytes: m.size_bytes, built_at: m.built_at, manifest_url: want.url, image };
}

// A pooled keep-alive socket the server has just closed fails with these;
// a GET is safe to send once more on a fresh connection.
const RETRYABLE_SOCKET_ERRORS = new Set(["ECONNRESET", "EPIPE", "UND_ERR_SOCKET"]);

type FetchError = Error & { cause?: { code?: string; message?: string } };

async function fetchText(url: string, signal: AbortSignal): Promise<{ res: Response; text: string }> {
  for (let attempt = 1; ; attempt++) {
    try {
      const res = await fetch(url, { signal, redirect: "follow", headers: { accept: "application/json" } });
      return { res, text: await res.text() };
    } catch (err) {
      const code = (err as FetchError).cause?.code;
      if (attempt >= 2 || signal.aborted || code === undefined || !RETRYABLE_SOCKET_ERRORS.has(code)) throw err;
    }
  }
}

async function fetchJson(url: string, timeoutMs: number): Promise<unknown> {
  let res: Response;
  let text: string;
  try {
    ({ res, text } = await fetchText(url, AbortSignal.timeout(timeoutMs)));
  } catch (err) {
    const e = err as FetchError;
    const detail = e.cause?.code ?? e.cause?.message ?? e.message;
    const why = e.name === "TimeoutError" ? `no answer within ${timeoutMs} ms` : `fetch failed (${detail})`;
    throw new ManifestError(url, why);
  }
  if (!res.ok) throw new ManifestError(url, `HTTP ${res.status} ${res.statusText}`);
  if (text.length > MAX_MANIFEST_BYTES) throw new ManifestError(url, `larger than ${MAX_MANIFEST_BYTES} bytes`);
  try {
    return JSON.parse(text) as unknown;
  } catch {
    throw new ManifestError(url, "is not valid JSON");
  }
}

export interface ManifestFetcherOptions {
  timeoutMs?: number;
  ttlMs?: number;
  now?: () => number;
}

/** Fetches and validates manifests; remembers good ones for `ttlMs`. */
export class ManifestFetcher {
  private readonly cache = new Map<string, { expires: number; value: Promise<ResolvedArtifact> }>();
  private readonly timeoutMs: number;
  private readonly ttlMs: number;
  private readonly now: () => number;

  constructor(opts: ManifestFetcherOptions = {}) {
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_MANIFEST_TIMEOUT_MS;
    this.ttlMs = opts.ttlMs ?? DEFAULT_MANIFEST_TTL_MS;
    this.now = opts.now ?? Date.now;
  }

  artifact(baseUrl: string, artifact: HubArtifactName, os: string, arch: Arch): Promise<ResolvedArtifact> {
    if (!(ARCHES as readonly string[]).includes(arch)) throw new Error(`unknown arch ${arch}`);
    const url = manifestUrl(baseUrl, artifact, os, arch);
    const hit = this.cache.get(url);
    if (hit && hit.expires > this.now()) return hit.value;
    // Concurrent callers share one request; a failure is dropped from the cache.
    const value = fetchJson(url, this.timeoutMs).then((body) => resolveManifest(body, { url, artifact, os, arch }));
    this.cache.set(url, { expires: this.now() + this.ttlMs, value });
    value.catch(() => {
      if (this.cache.get(url)?.value === value) this.cache.delete(url);
    });
    return value;
  }

  clear(): void {
    this.cache.clear();
  }
}
