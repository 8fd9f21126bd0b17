/**
 * A real HTTP server on 127.0.0.1 that serves artifact manifests, with knobs
 * for the failure cases (wrong body, slow answer, HTTP errors).
 */
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";

export interface ServedFile {
  status?: number;
  body: string;
  delayMs?: number;
}

export interface ManifestServer {
  baseUrl: string;
  files: Map<string, ServedFile>;
  hits: Map<string, number>;
  close(): Promise<void>;
}

export async function startManifestServer(): Promise<ManifestServer> {
  const files = new Map<string, ServedFile>();
  const hits = new Map<string, number>();
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0]!;
    hits.set(path, (hits.get(path) ?? 0) + 1);
    const file = files.get(path);
    const answer = () => {
      if (!file) {
        res.writeHead(404, { "content-type": "text/plain" }).end("not found");
        return;
      }
      res.writeHead(file.status ?? 200, { "content-type": "application/json" }).end(file.body);
    };
    if (file?.delayMs) setTimeout(answer, file.delayMs).unref();
    else answer();
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    baseUrl: `http://127.0.0.1:${port}/software`,
    files,
    hits,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

export const ARTIFACT_DIRS = { project_host: "project-host", project: "project", tools: "tools" } as const;

/** A good manifest for `artifact` (version in the field, or only in the URL). */
export function goodManifest(
  baseUrl: string,
  dir: string,
  arch = "amd64",
  opts: { version?: string; versionInUrlOnly?: boolean; sha256?: string } = {},
): Record<string, unknown> {
  const version = opts.version ?? "1.2.3";
  const m: Record<string, unknown> = {
    url: `${baseUrl}/${dir}/${version}/${dir}-linux-${arch}.tar.xz`,
    sha256: opts.sha256 ?? "ab".repeat(32),
    size_bytes: 1234567,
    built_at: "2025-06-01T12:00:00Z",
    os: "linux",
    arch,
  };
  if (!opts.versionInUrlOnly) m.version = version;
  return m;
}

/** Serve good manifests for all three artifacts and `arch`. */
export function serveGoodManifests(srv: ManifestServer, arch = "amd64"): void {
  for (const dir of Object.values(ARTIFACT_DIRS)) {
    srv.files.set(`/software/${dir}/latest-linux-${arch}.json`, { body: JSON.stringify(goodManifest(srv.baseUrl, dir, arch)) });
  }
}

export function manifestPath(dir: string, arch = "amd64"): string {
  return `/software/${dir}/latest-linux-${arch}.json`;
}
