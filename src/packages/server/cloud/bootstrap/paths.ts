/**
 * Files this package ships besides its compiled JS (SQL migrations, the
 * compiled progress page and its style sheet). Found from the package root, so the same code works
 * from the TypeScript sources (tests, tsx) and from `dist/` (node).
 */
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const PACKAGE_NAME = "@cocalc/server";

function findPackageRoot(start: string): string {
  for (let dir = start; ; dir = dirname(dir)) {
    const manifest = join(dir, "package.json");
    if (existsSync(manifest)) {
      const name: unknown = (JSON.parse(readFileSync(manifest, "utf8")) as { name?: unknown }).name;
      if (name === PACKAGE_NAME) return dir;
    }
    if (dirname(dir) === dir) throw new Error(`cannot find the ${PACKAGE_NAME} package root above ${start}`);
  }
}

export const PACKAGE_ROOT = findPackageRoot(dirname(fileURLToPath(import.meta.url)));
export const MIGRATIONS_DIR = join(PACKAGE_ROOT, "cloud", "bootstrap", "migrations");
/** Output of `tsc -p cloud/bootstrap/page/tsconfig.json` (the `build:page` script). */
export const PAGE_JS_PATH = join(PACKAGE_ROOT, "dist", "page", "page", "progress-page.js");
/** The page's style sheet (a static file, shipped as it is). */
export const PAGE_CSS_PATH = join(PACKAGE_ROOT, "cloud", "bootstrap", "page", "progress-page.css");
/** The fleet page's script (same build) and style sheet. */
export const FLEET_JS_PATH = join(PACKAGE_ROOT, "dist", "page", "page", "fleet-page.js");
export const FLEET_CSS_PATH = join(PACKAGE_ROOT, "cloud", "bootstrap", "page", "fleet-page.css");
