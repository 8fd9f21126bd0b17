/**
 * One example host, used by `render-example.ts` (README, lint:shell) and the
 * tests. Values look like production but point at 127.0.0.1.
 */
import type { HostFacts } from "../src/builders.js";

export const EXAMPLE_HOST_ID = "3f2c8a1e-7b4d-4e5f-9a6b-0c1d2e3f4a5b";
export const EXAMPLE_BASE_URL = `http://127.0.0.1:9000/api/bootstrap/hosts/${EXAMPLE_HOST_ID}`;
/** Not a real token: only for rendering examples. */
export const EXAMPLE_TOKEN = "example-token-not-secret-0123456789abcdef";

export function exampleHostFacts(): HostFacts {
  const bundles = "https://example.invalid/software";
  return {
    host: { id: EXAMPLE_HOST_ID, name: "example-host-1" },
    bootstrap_user: "ubuntu",
    disk_size_gb: 100,
    arch: "amd64",
    artifacts: {
      project_host: {
        url: `${bundles}/project-host/1.4.2/project-host-linux-amd64.tar.xz`,
        sha256: "a".repeat(64),
        version: "1.4.2",
        size_bytes: 48_000_000,
        strip_components: 1,
        expected_files: ["bin/project-host"],
        executables: ["bin/project-host"],
      },
      project: {
        url: `${bundles}/project/1.4.2/project-linux-amd64.tar.xz`,
        sha256: null,
        version: "1.4.2",
      },
      tools: {
        url: `${bundles}/tools/2024.11.1/tools-linux-amd64.tar.xz`,
        sha256: "b".repeat(64),
        version: "2024.11.1",
        size_bytes: 150_000_000,
      },
    },
    node: { version: "20.18.1", dist_url: "https://nodejs.org/dist" },
    hub: {
      url: EXAMPLE_BASE_URL,
      events_url: `${EXAMPLE_BASE_URL}/events`,
      secrets_url: `${EXAMPLE_BASE_URL}/secrets`,
    },
    conat_urls: ["http://127.0.0.1:9000/conat"],
    secrets: ["conat-password"],
    service: { exec: "bin/project-host", health_url: "http://127.0.0.1:9002/health" },
  };
}
