import { readFile } from "node:fs/promises";
import { PAGE_CSS_PATH, PAGE_JS_PATH } from "./paths.js";

const BUILD_HINT = "the progress page is not built: run `pnpm --filter @cocalc/server build` (or `build:page`)";

/** The progress page is missing its compiled script: the hub answers 503 and says why. */
export class PageNotBuiltError extends Error {
  override readonly name = "PageNotBuiltError";
  constructor(path: string) {
    super(`${BUILD_HINT} (${path} is missing)`);
  }
}

let script: Promise<Buffer> | null = null;
let style: Promise<Buffer> | null = null;

/** Read a compiled page script; a missing file is a PageNotBuiltError. */
export async function readPageScript(path: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (err) {
    throw (err as NodeJS.ErrnoException).code === "ENOENT" ? new PageNotBuiltError(path) : err;
  }
}

/**
 * The page's browser script: the compiled file from the build
 * (`page/progress-page.ts` → `dist/page/…`), read once. Nothing is transpiled
 * at run time: without a build this fails with PageNotBuiltError.
 */
export function progressPageScript(): Promise<Buffer> {
  script ??= readPageScript(PAGE_JS_PATH).catch((err: unknown) => {
    script = null;
    throw err;
  });
  return script;
}

/** The page's style sheet, a static file shipped with the package (`page/progress-page.css`), read once. */
export function progressPageStyle(): Promise<Buffer> {
  style ??= readFile(PAGE_CSS_PATH).catch((err: unknown) => {
    style = null;
    throw err;
  });
  return style;
}

/**
 * The progress page's HTML shell. Everything dynamic is done by
 * `page/progress-page.ts` (compiled to plain browser JS), which fetches
 * `status` and then follows `stream`, both relative to the page's URL.
 */

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

export function progressPageHtml(hostId: string): string {
  const id = escapeHtml(hostId);
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Bootstrap · ${id}</title>
<link rel="stylesheet" href="progress-page.css">
</head>
<body>
<main data-host-id="${id}">
  <h1>Project host bootstrap <span id="state" class="badge">loading</span></h1>
  <div class="sub">host ${id} · <span id="run">no run yet</span></div>
  <section class="card">
    <div id="phase">Loading…</div>
    <div class="bar" id="bar"><div></div></div>
    <div class="nums"><span id="percent">0%</span><span id="eta"></span></div>
    <div class="meta" id="silence"></div>
  </section>
  <section class="card" id="failure" hidden>
    <h2>Failed at <span id="failure-step"></span></h2>
    <div id="failure-message"></div>
    <div id="failure-hint"></div>
    <pre id="log-tail"></pre>
  </section>
  <section class="card"><h2>Steps</h2><ol id="steps"></ol></section>
  <section class="card"><h2>Timeline</h2><svg id="waterfall" role="img" aria-label="step timings"></svg></section>
  <div class="meta" id="meta"></div>
</main>
<script type="module" src="progress-page.js"></script>
</body>
</html>
`;
}
