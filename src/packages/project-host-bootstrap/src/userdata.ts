/**
 * Provider user-data: where each cloud (or the self-host connector) puts the
 * stub, rendered from one rendered stub (`renderStub()`).
 *
 * - `script`: the stub itself, as a shell script user-data (`#!/bin/sh` first
 *   line, so cloud-init runs it as a part-handler script). For GCP's
 *   `startup-script` metadata (which runs on **every boot**), and for
 *   Hyperstack's and Lambda's `user_data`.
 * - `cloud-config`: a `#cloud-config` document that writes the stub to a
 *   root-only file and runs it from `runcmd`. Used for Nebius and for the
 *   self-host connector's `multipass launch --cloud-init <file>`.
 *
 * On purpose unlike the old Nebius form (`runcmd: [bash, -lc, <script>]`):
 * the stub carries the host's token, and a `runcmd` argument is an argv,
 * visible to every process on the VM through /proc. Here the stub is written
 * by cloud-init's `write_files` (mode 0700, root) and `runcmd` runs
 * `sh <path>`: the token is never an argument of any process.
 *
 * The document is YAML written as JSON (YAML is a superset of JSON), so the
 * stub's bytes survive exactly whatever they contain, with no YAML quoting
 * rules to get wrong. The tests validate every rendered document with
 * cloud-init's own schema validator (`cloud-init schema --config-file`).
 */

/** The placements upstream uses. */
export type UserDataPlacement = "gcp-startup-script" | "user-data-script" | "nebius-cloud-config" | "multipass-cloud-config";

export const USER_DATA_PLACEMENTS: readonly UserDataPlacement[] = [
  "gcp-startup-script",
  "user-data-script",
  "nebius-cloud-config",
  "multipass-cloud-config",
];

/** Where the `cloud-config` forms write the stub (root-only, like the old connector's file). */
export const CLOUD_CONFIG_STUB_PATH = "/root/cocalc-bootstrap.sh";

export class UserDataError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UserDataError";
  }
}

/** The `#cloud-config` object for a stub (exported for tests and for callers that merge their own keys). */
export function cloudConfigFor(stub: string): Record<string, unknown> {
  return {
    write_files: [{ path: CLOUD_CONFIG_STUB_PATH, owner: "root:root", permissions: "0700", content: stub }],
    runcmd: [["sh", CLOUD_CONFIG_STUB_PATH]],
  };
}

function checkStub(stub: string): void {
  if (!stub.startsWith("#!/bin/sh\n")) {
    throw new UserDataError("stub: must be a rendered stub (starting with #!/bin/sh); render it with renderStub()");
  }
  if (stub.includes("\0")) throw new UserDataError("stub: contains a NUL byte; render it with renderStub()");
}

/**
 * Render the user-data for one placement. Throws `UserDataError` (naming the
 * argument) for an unknown placement or something that is not a rendered stub.
 */
export function renderUserData(placement: UserDataPlacement, stub: string): string {
  checkStub(stub);
  switch (placement) {
    case "gcp-startup-script":
    case "user-data-script":
      return stub;
    case "nebius-cloud-config":
    case "multipass-cloud-config":
      return `#cloud-config\n${JSON.stringify(cloudConfigFor(stub), null, 2)}\n`;
    default:
      throw new UserDataError(
        `placement: unknown ${JSON.stringify(placement)}; use one of ${USER_DATA_PLACEMENTS.join(", ")}`,
      );
  }
}
