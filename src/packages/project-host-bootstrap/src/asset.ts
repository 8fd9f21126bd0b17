/**
 * bootstrap.py as a package asset. The hub serves these exact bytes and
 * embeds their sha256 in every stub it renders, so bytes and hash always come
 * from one read of the file (cached together).
 */
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

/**
 * Absolute path of bootstrap.py inside this package. Resolved from this
 * module's own URL: `src/asset.ts` (tsx, vitest) and `dist/asset.js` (node)
 * both sit one level below the package root, next to `python/`.
 */
export const BOOTSTRAP_PY_PATH: string = fileURLToPath(new URL("../python/bootstrap.py", import.meta.url));

interface BootstrapPyAsset {
  readonly bytes: Buffer;
  readonly sha256: string;
}

let cached: BootstrapPyAsset | undefined;

function loadAsset(): BootstrapPyAsset {
  if (cached === undefined) {
    const bytes = readFileSync(BOOTSTRAP_PY_PATH);
    cached = { bytes, sha256: createHash("sha256").update(bytes).digest("hex") };
  }
  return cached;
}

/** The bytes of bootstrap.py (a fresh copy: callers cannot change the cached one). */
export function bootstrapPyBytes(): Buffer {
  return Buffer.from(loadAsset().bytes);
}

/** Lowercase hex sha256 of exactly the bytes `bootstrapPyBytes()` returns. */
export function bootstrapPySha256(): string {
  return loadAsset().sha256;
}
