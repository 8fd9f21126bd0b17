import { readFile } from "node:fs/promises";
import { FLEET_CSS_PATH, FLEET_JS_PATH, PAGE_CSS_PATH, PAGE_JS_PATH } from "./paths.js";

const BUILD_HINT = "the progress page is not built: run `pnpm --filter @cocalc/server build` (or `build:page`)";

/** The progress page is missing its compiled script: the hub answers 503 and says why. */
export class PageNotBuiltError extends Error {
  override readonly name = "PageNotBuiltError";
  constructor(path: string) {
    super(`${BUILD_HINT} (${path} is missing)`);
  }
}

const cache = new Map<string, Promise<Buffer>>();

/** A file read once; a failed read is tried again next time. */
function readOnce(path: string, read: (p: string) => Promise<Buffer>): Promise<Buffer> {
  let p = cache.get(path);
  if (!p) {
    p = read(path).catch((err: unknown) => {
      cache.delete(path);
      throw err;
    });
    cache.set(path, p);
  }
  return p;
}

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
  return readOnce(PAGE_JS_PATH, readPageScript);
}

/** The page's style sheet, a static file shipped with the package (`page/progress-page.css`), read once. */
export function progressPageStyle(): Promise<Buffer> {
  return readOnce(PAGE_CSS_PATH, (p) => readFile(p));
}

/** The fleet page's script (`page/fleet-page.ts`, same build) and style sheet. */
export function fleetPageScript(): Promise<Buffer> {
  return readOnce(FLEET_JS_PATH, readPageScript);
}

export function fleetPageStyle(): Promise<Buffer> {
  return readOnce(FLEET_CSS_PATH, (p) => readFile(p));
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

/** The fleet page's HTML shell; `page/fleet-page.ts` fetches `status` (with the page's query) every few seconds. */
export function fleetPageHtml(): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Bootstrap · fleet</title>
<link rel="stylesheet" href="fleet-page.css">
</head>
<body>
<main>
  <h1>Project host bootstrap · fleet</h1>
  <div class="sub" id="summary">Loading…</div>
  <section class="card"><h2>Hosts <span class="meta">(latest run of each; failed and stale first)</span></h2>
    <table id="hosts"><thead><tr><th>host</th><th>state</th><th>phase</th><th>percent</th><th>age</th><th>last heard</th></tr></thead><tbody></tbody></table>
  </section>
  <section class="card"><h2>Steps <span class="meta" id="window"></span></h2>
    <table id="steps"><thead><tr><th>step</th><th>runs</th><th>p50</th><th>p95</th><th>max</th><th>failed</th><th>did work</th><th>p50 (work)</th><th>p95 (work)</th><th></th></tr></thead><tbody></tbody></table>
  </section>
  <div class="meta" id="meta"></div>
</main>
<script type="module" src="fleet-page.js"></script>
</body>
</html>
`;
}
