/**
 * vitest globalSetup: compile the progress page's browser script, so the
 * routes serve the current one however vitest was started (`pnpm test`,
 * `vitest run` from scripts/test.sh, an editor).
 */
import { execFile } from "node:child_process";
import { createRequire } from "node:module";
import { join } from "node:path";
import { promisify } from "node:util";
import { PACKAGE_ROOT } from "../cloud/bootstrap/paths.js";

export default async function setup(): Promise<void> {
  const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
  try {
    await promisify(execFile)(process.execPath, [tsc, "-p", join(PACKAGE_ROOT, "cloud/bootstrap/page/tsconfig.json")]);
  } catch (err) {
    const e = err as Error & { stdout?: string };
    throw new Error(`compiling the progress page failed:\n${e.stdout ?? e.message}`);
  }
}
