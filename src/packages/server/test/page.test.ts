/**
 * The progress page in a real headless Chromium (Debian's `chromium`, driven
 * by playwright-core; never a downloaded browser). Screenshots go to
 * `test-artifacts/` (gitignored).
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { BootstrapEventInput } from "@cocalc/project-host-bootstrap";
import { type BrowserContext, chromium, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Db, openPglite } from "../cloud/bootstrap/db.js";
import { type RunningHub, startHub } from "../cloud/bootstrap/hub.js";
import { PACKAGE_ROOT } from "../cloud/bootstrap/paths.js";
import { hostRecord, RunScript } from "./support/fixtures.js";
import { type ManifestServer, serveGoodManifests, startManifestServer } from "./support/manifest-server.js";

const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--disable-quic",
];
const ARTIFACTS = join(PACKAGE_ROOT, "test-artifacts");
const skipWhy = process.env.SKIP_CHROMIUM === "1" ? "SKIP_CHROMIUM=1 is set" : null;
if (skipWhy) console.warn(`progress page tests skipped: ${skipWhy}`);

describe.skipIf(skipWhy !== null)("progress page in headless Chromium", () => {
  let srv: ManifestServer;
  let db: Db;
  let hub: RunningHub;
  let profile: string;
  let context: BrowserContext;
  let page: Page;
  let navigations = 0;

  beforeAll(async () => {
    if (!existsSync(CHROMIUM))
      throw new Error(`${CHROMIUM} not found: install Debian's chromium package (apt-get install -y chromium), or set SKIP_CHROMIUM=1`);
    mkdirSync(ARTIFACTS, { recursive: true });
    srv = await startManifestServer();
    serveGoodManifests(srv);
    db = await openPglite();
    hub = await startHub({ db, artifactBaseUrl: srv.baseUrl, streamRecheckMs: 1000 });
    profile = mkdtempSync(join(tmpdir(), "cocalc-chromium-"));
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      viewport: { width: 1100, height: 900 },
    });
    page = context.pages()[0] ?? (await context.newPage());
    page.on("framenavigated", (f) => {
      if (f === page.mainFrame()) navigations++;
    });
  }, 180_000); // PGlite + Chromium start slowly on a loaded 2-core machine (60 s timed out at load 20+)

  afterAll(async () => {
    await context?.close();
    if (profile) rmSync(profile, { recursive: true, force: true });
    await hub?.close();
    await db?.close();
    await srv?.close();
  });

  async function postEvents(hostId: string, token: string, events: BootstrapEventInput[]): Promise<void> {
    const res = await fetch(`${hub.bootstrapUrl}/hosts/${hostId}/events`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
      body: JSON.stringify({ host_id: hostId, events }),
    });
    expect(res.status).toBe(200);
  }

  it("shows a run's steps, moves live as events arrive, and shows the failure", async () => {
    const host = await hub.provisionHost(hostRecord(), { secrets: {} });
    const run = new RunScript(undefined, Date.now() / 1000 - 30);
    run.start().stepStart("preflight").wait(-0.2).stepEnd("preflight", "unchanged", 0.8).stepStart("apt").wait(-1).stepStart("download.project_host").wait(-1);
    run.stepStart("node").wait(-1).progress("downloading bundles, installing packages", 12);
    await postEvents(host.hostId, host.token, run.events);

    await page.goto(`${host.baseUrl}/`);
    const loads = navigations;
    await page.locator('#steps li[data-step="apt"][data-state="running"]').waitFor();
    expect(await page.locator("#percent").textContent()).toBe("12%");
    expect(await page.locator("#state").textContent()).toBe("running");
    expect(await page.locator("#steps li").count()).toBe(6);
    expect(await page.locator('#steps li[data-step="preflight"]').getAttribute("data-state")).toBe("unchanged");

    // New events move the page without a reload.
    const more = run.events.length;
    // Timestamps match the durations: download ends 14 s after it started, node 17 s, apt 21 s.
    run.wait(13).stepEnd("download.project_host", "changed", 14).wait(2).stepEnd("node", "changed", 17).wait(3).stepEnd("apt", "changed", 21);
    run.wait(-1).stepStart("install").wait(-1).progress("installing bundles", 64);
    await postEvents(host.hostId, host.token, run.events.slice(more));
    await page.locator("#percent", { hasText: "64%" }).waitFor({ timeout: 10_000 });
    expect(await page.locator("#phase").textContent()).toBe("installing bundles");
    expect(await page.locator("#eta").textContent()).toMatch(/left/);
    expect(await page.locator("svg#waterfall rect[data-step]").count()).toBe(5);
    await page.waitForTimeout(600); // let the bar's CSS transition finish for the screenshot
    await page.screenshot({ path: join(ARTIFACTS, "progress-page-running.png"), fullPage: true });

    const tail = run.events.length;
    const hint = "The project-host bundle has no bin/project-host; check the bundle's layout.";
    run.wait(1).stepEnd("install", "failed", 2, {
      message: "expected file bin/project-host missing",
      hint,
      log_tail: "tar: bin/project-host: Not found in archive\nexit status 2",
    });
    run.end(false, { failed_step: "install", hint, log_tail: "tar: bin/project-host: Not found in archive\nexit status 2" });
    await postEvents(host.hostId, host.token, run.events.slice(tail));
    await page.locator("#failure-hint", { hasText: "no bin/project-host" }).waitFor({ timeout: 10_000 });
    expect(await page.locator("#failure").isVisible()).toBe(true);
    expect(await page.locator("#failure-step").textContent()).toBe("install");
    expect(await page.locator("#log-tail").textContent()).toContain("Not found in archive");
    expect(await page.locator("#state").textContent()).toBe("failed");
    expect(await page.locator('#steps li[data-step="install"]').getAttribute("data-state")).toBe("failed");
    expect(navigations).toBe(loads);
    await page.screenshot({ path: join(ARTIFACTS, "progress-page-failed.png"), fullPage: true });
  });
});
