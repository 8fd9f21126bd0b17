/**
 * The page's script comes from the build only: no TypeScript is transpiled at
 * run time, and a missing build fails clearly. The style sheet is a static
 * file shipped with the package.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { PageNotBuiltError, progressPageHtml, progressPageStyle, readPageScript } from "../cloud/bootstrap/page.js";
import { PACKAGE_ROOT, PAGE_CSS_PATH } from "../cloud/bootstrap/paths.js";

describe("progress page assets", () => {
  it("a missing compiled script is a PageNotBuiltError that says how to build", async () => {
    const missing = join(PACKAGE_ROOT, "dist", "no-such-dir", "progress-page.js");
    const err = await readPageScript(missing).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PageNotBuiltError);
    expect((err as Error).message).toMatch(/not built: run `pnpm --filter @cocalc\/server build`/);
    expect((err as Error).message).toContain(missing);
  });

  it("no shipped module imports the TypeScript compiler", () => {
    for (const file of ["page.ts", "routes.ts", "app.ts", "hub.ts"]) {
      const text = readFileSync(join(PACKAGE_ROOT, "cloud", "bootstrap", file), "utf8");
      expect(text, file).not.toMatch(/["']typescript["']/);
    }
  });

  it("the style sheet is the shipped static file, linked from the page (no inline style)", async () => {
    expect((await progressPageStyle()).toString()).toBe(readFileSync(PAGE_CSS_PATH, "utf8"));
    const pkg = JSON.parse(readFileSync(join(PACKAGE_ROOT, "package.json"), "utf8")) as { files: string[] };
    expect(pkg.files).toContain("cloud/bootstrap/page/progress-page.css");
    const html = progressPageHtml("0b0e2f4a-1c2d-4e5f-8a9b-0c1d2e3f4a5b");
    expect(html).toContain('<link rel="stylesheet" href="progress-page.css">');
    expect(html).not.toContain("<style");
  });
});
