/**
 * The fleet page in a real headless Chromium (Debian's `chromium`, driven by
 * playwright-core), like the progress page. Screenshot:
 * `test-artifacts/fleet-page.png` (gitignored).
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { BootstrapEventInput } from "@cocalc/project-host-bootstrap";
import { type BrowserContext, chromium, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type RunningHub, startHub } from "../cloud/bootstrap/hub.js";
import { PACKAGE_ROOT } from "../cloud/bootstrap/paths.js";
import { hostRecord, RunScript } from "./support/fixtures.js";
import { type ManifestServer, serveGoodManifests, startManifestServer } from "./support/manifest-server.js";

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const ARTIFACTS = join(PACKAGE_ROOT, "test-artifacts");
const skipWhy = process.env.SKIP_CHROMIUM === "1" ? "SKIP_CHROMIUM=1 is set" : null;
if (skipWhy) console.warn(`fleet page tests skipped: ${skipWhy}`);

/** The benchmark's plan, roughly: what the fleet page is for. */
const PLAN = ["preflight", "apt", "download_project_host", "node", "install_project_host", "btrfs", "service", "finalize"].map((name) => ({
  name,
  deps: [],
  weight: 1,
}));

describe.skipIf(skipWhy !== null)("fleet page in headless Chromium", () => {
  let srv: ManifestServer;
  let hub: RunningHub;
  let profile: string;
  let context: BrowserContext;
  let page: Page;

  beforeAll(async () => {
    if (!existsSync(CHROMIUM))
      throw new Error(`${CHROMIUM} not found: install Debian's chromium package (apt-get install -y chromium), or set SKIP_CHROMIUM=1`);
    mkdirSync(ARTIFACTS, { recursive: true });
    srv = await startManifestServer();
    serveGoodManifests(srv);
    hub = await startHub({ artifactBaseUrl: srv.baseUrl });
    profile = mkdtempSync(join(tmpdir(), "cocalc-chromium-"));
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1200, height: 900 },
    });
    page = context.pages()[0] ?? (await context.newPage());
  }, 180_000); // PGlite + Chromium start slowly on a loaded 2-core machine

  afterAll(async () => {
    await context?.close();
    if (profile) rmSync(profile, { recursive: true, force: true });
    await hub?.close();
    await srv?.close();
  });

  async function host(name: string, events: (run: RunScript) => void, t0 = Date.now() / 1000 - 120) {
    const p = await hub.provisionHost(hostRecord({ name }), { secrets: {} });
    const run = new RunScript(undefined, t0).start(PLAN);
    events(run);
    await post(p.hostId, p.token, run.events);
    return { ...p, run };
  }

  async function post(hostId: string, token: string, events: BootstrapEventInput[]) {
    const r = await fetch(`${hub.bootstrapUrl}/hosts/${hostId}/events`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
      body: JSON.stringify({ host_id: hostId, events }),
    });
    expect(r.status).toBe(200);
  }

  /** Each step once, in plan order, with these durations; a step not given is unchanged in 0.2 s. */
  const allSteps = (run: RunScript, d: Record<string, number>) => {
    for (const { name } of PLAN) run.stepStart(name).stepEnd(name, name in d ? "changed" : "unchanged", d[name] ?? 0.2);
  };

  it("shows every host's latest run, the stuck one first, and which step is slow everywhere; updates without a reload", async () => {
    for (let i = 0; i < 3; i++) {
      await host(`done-${i}`, (r) => {
        allSteps(r, { apt: 40 + 10 * i, download_project_host: 8 + i, node: 12, service: 4 });
        r.end(true);
      });
    }
    await host("failed-0", (r) => {
      r.stepStart("preflight").stepEnd("preflight", "changed", 0.4).stepStart("apt");
      r.stepEnd("apt", "failed", 300, { message: "apt-get install timed out", hint: "Check the apt mirror." }).end(false, { failed_step: "apt" });
    });
    const running = await host("running-0", (r) => {
      r.stepStart("preflight").stepEnd("preflight", "changed", 0.3).stepStart("apt").progress("installing packages <img src=x onerror=alert(1)>", 20);
    });
    await hub.provisionHost(hostRecord({ name: "pending-0" }), { secrets: {} });

    await page.goto(`${hub.bootstrapUrl}/fleet/`);
    await page.locator("#hosts tbody tr[data-host]").first().waitFor();
    const names = await page.locator("#hosts tbody tr[data-host] a").allTextContents();
    expect(names.slice(0, 3)).toEqual(["failed-0", "running-0", "pending-0"]);
    expect(names.slice(3).sort()).toEqual(["done-0", "done-1", "done-2"]); // same age: in host id order
    expect(await page.locator("#summary").textContent()).toBe("6 hosts: 1 failed · 0 stale · 1 running · 1 pending · 3 done");
    const runningRow = page.locator(`#hosts tr[data-host="${running.hostId}"]`);
    expect(await runningRow.getAttribute("data-state")).toBe("running");
    // hostile text from a host is shown as text, never as markup
    expect(await runningRow.locator("td.phase").textContent()).toBe("installing packages <img src=x onerror=alert(1)>");
    expect(await page.locator("#hosts img").count()).toBe(0);
    expect(await runningRow.locator("td.percent").textContent()).toBe("20%");
    expect(await runningRow.locator("a").getAttribute("href")).toBe(`../hosts/${running.hostId}/`);
    // steps: apt is the slowest everywhere (p95 over 40, 50, 60 and the failed 300)
    const first = page.locator("#steps tbody tr").first();
    expect(await first.getAttribute("data-step")).toBe("apt");
    expect(await first.locator("td.runs").textContent()).toBe("4");
    expect(await first.locator("td.p50").textContent()).toBe("55 s");
    expect(await first.locator("td.p95").textContent()).toBe("4 min 24 s"); // 60 + (300 - 60) * 0.85 = 264 s
    expect(await first.locator("td.failed").textContent()).toBe("1");
    expect(await first.locator("td.work-runs").textContent()).toBe("4");
    // preflight did work in every run (changed), btrfs in none (unchanged everywhere)
    expect(await page.locator('#steps tr[data-step="btrfs"] td.work-p50').textContent()).toBe("–");
    await page.screenshot({ path: join(ARTIFACTS, "fleet-page.png"), fullPage: true });

    // the running host finishes: the page follows within its refresh
    const more = running.run.events.length;
    running.run.stepEnd("apt", "changed", 45);
    for (const { name } of PLAN.slice(2)) running.run.stepStart(name).stepEnd(name, "changed", 1);
    running.run.end(true);
    await post(running.hostId, running.token, running.run.events.slice(more));
    await page.locator(`#hosts tr[data-host="${running.hostId}"][data-state="done"]`).waitFor({ timeout: 15_000 });
    expect(await page.locator("#summary").textContent()).toBe("6 hosts: 1 failed · 0 stale · 0 running · 1 pending · 4 done");
  });

  it("a bad query string is refused with its reason", async () => {
    const r = await page.goto(`${hub.bootstrapUrl}/fleet/?window_s=-1`);
    expect(r?.status()).toBe(400);
    expect(await page.locator("body").textContent()).toContain("window_s");
  });
});
