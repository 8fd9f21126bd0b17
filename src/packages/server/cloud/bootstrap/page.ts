import { readFile } from "node:fs/promises";
import { PAGE_JS_PATH, PAGE_TS_PATH } from "./paths.js";

let transpiled: Promise<Buffer> | null = null;

/**
 * The page's browser script: the compiled file from the build, or else the
 * source transpiled once in-process (running from sources with tsx or vitest
 * must not need a build step first).
 */
export async function progressPageScript(): Promise<Buffer> {
  try {
    return await readFile(PAGE_JS_PATH);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
  transpiled ??= transpilePage();
  return transpiled;
}

async function transpilePage(): Promise<Buffer> {
  const ts = (await import("typescript")).default;
  const source = await readFile(PAGE_TS_PATH, "utf8");
  const out = ts.transpileModule(source, {
    compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ES2022 },
    fileName: PAGE_TS_PATH,
  });
  return Buffer.from(out.outputText);
}

/**
 * The progress page's HTML shell. Everything dynamic is done by
 * `page/progress-page.ts` (compiled to plain browser JS), which fetches
 * `status` and then follows `stream`, both relative to the page's URL.
 */

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const STYLE = `
:root { --ok:#2e7d32; --run:#1565c0; --fail:#c62828; --stale:#ef6c00; --muted:#6b7280; --line:#e5e7eb; --skip:#9e9e9e; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #111827; background: #f6f7f9; }
main { max-width: 1000px; margin: 0 auto; padding: 24px; }
h1 { font-size: 20px; margin: 0 0 4px; }
.sub { color: var(--muted); font-size: 13px; word-break: break-all; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px; margin: 16px 0; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 999px; font-size: 13px; font-weight: 600; color: #fff; background: var(--muted); vertical-align: middle; }
.badge.running { background: var(--run); } .badge.done { background: var(--ok); } .badge.failed { background: var(--fail); } .badge.stale { background: var(--stale); }
#phase { font-size: 16px; margin: 6px 0 10px; }
.bar { height: 14px; background: var(--line); border-radius: 7px; overflow: hidden; }
.bar > div { height: 100%; width: 0; background: var(--run); transition: width .4s ease; }
.bar.done > div { background: var(--ok); } .bar.failed > div { background: var(--fail); } .bar.stale > div { background: var(--stale); }
.nums { display: flex; justify-content: space-between; margin-top: 6px; font-variant-numeric: tabular-nums; }
#percent { font-weight: 700; font-size: 18px; }
#failure { border-color: #f5c2c2; background: #fff6f6; }
#failure h2 { color: var(--fail); font-size: 16px; margin: 0 0 6px; }
#failure-hint { font-weight: 600; margin: 6px 0; }
pre { background: #111827; color: #e5e7eb; padding: 10px 12px; border-radius: 8px; overflow: auto; max-height: 320px; font-size: 12px; }
h2 { font-size: 15px; margin: 0 0 10px; }
ol#steps { list-style: none; margin: 0; padding: 0; }
ol#steps li { display: grid; grid-template-columns: 18px 1fr auto; gap: 8px; align-items: center; padding: 5px 0; border-bottom: 1px solid var(--line); }
ol#steps li:last-child { border-bottom: 0; }
.dot { width: 12px; height: 12px; border-radius: 50%; background: var(--line); }
li[data-state=running] .dot { background: var(--run); animation: pulse 1s infinite alternate; }
li[data-state=changed] .dot, li[data-state=unchanged] .dot { background: var(--ok); }
li[data-state=failed] .dot { background: var(--fail); } li[data-state=blocked] .dot, li[data-state=skipped] .dot { background: var(--skip); }
@keyframes pulse { from { opacity: 1; } to { opacity: .35; } }
.step-name { font-family: ui-monospace, Menlo, monospace; font-size: 13px; }
.step-state { color: var(--muted); font-size: 13px; font-variant-numeric: tabular-nums; }
svg#waterfall { width: 100%; display: block; }
svg text { font: 11px ui-monospace, Menlo, monospace; fill: #374151; }
.meta { color: var(--muted); font-size: 12px; }
`;

export function progressPageHtml(hostId: string): string {
  const id = escapeHtml(hostId);
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Bootstrap · ${id}</title>
<style>${STYLE}</style>
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
