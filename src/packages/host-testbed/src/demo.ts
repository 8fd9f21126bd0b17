/**
 * `pnpm demo`: the whole thing on this machine, with live progress.
 *
 *   pnpm demo          build the artifacts, start the hub (background, PGlite),
 *                      boot a throwaway host, bootstrap it through the hub's
 *                      real stub, print the progress page and the timings;
 *                      leave everything up to explore
 *   pnpm demo rerun    run the same stub again (the idempotent re-run, with timings)
 *   pnpm demo exec -- CMD   run CMD in the demo host (default: a shell)
 *   pnpm demo down     stop the host and the hub, delete what they made
 *
 * State lives in DEMO_DIR (default /var/tmp/cocalc-host-testbed/demo):
 * services.json and hub.pid for the background hub, host.json for the host.
 */
import { spawn, spawnSync } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { BootstrapConfig } from "@cocalc/project-host-bootstrap";
import type { DemoServices } from "./demo-services.js";
import { ThrowawayHost } from "./host.js";
import { whyNotSupported } from "./machine.js";
import { sleep } from "./proc.js";
import { freePort, STUB_PATH, testHostRecord, testSecrets } from "./testbed.js";

const DEMO_DIR = process.env.DEMO_DIR ?? "/var/tmp/cocalc-host-testbed/demo";
const HOST_NAME = process.env.DEMO_HOST ?? "cocalc-demo-host";
const PKG_DIR = fileURLToPath(new URL("..", import.meta.url));

const say = (line = "") => process.stdout.write(`${line}\n`);
const note = (line: string) => process.stderr.write(`demo: ${line}\n`);

interface DemoHost {
  name: string;
  hostId: string;
  pageUrl: string;
  statusUrl: string;
  healthUrl: string;
  configFile: string;
  bootstrapDir: string;
  user: string;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function readJson<T>(file: string): T | null {
  try {
    return JSON.parse(readFileSync(file, "utf8")) as T;
  } catch {
    return null;
  }
}

/** Start demo-services.ts detached (it outlives this process) and wait until it is ready. */
async function startServices(): Promise<DemoServices> {
  const servicesFile = join(DEMO_DIR, "services.json");
  rmSync(servicesFile, { force: true });
  const logFile = join(DEMO_DIR, "services.log");
  const out = openSync(logFile, "w");
  // node with tsx's loader (not the tsx CLI, which forks): one process, one PID to stop.
  const args = ["--import", "tsx", join(PKG_DIR, "src", "demo-services.ts"), "--dir", DEMO_DIR];
  if (process.env.DEMO_HUB_PORT) args.push("--port", process.env.DEMO_HUB_PORT);
  const env = { ...process.env, TSX_TSCONFIG_PATH: join(PKG_DIR, "tsconfig.json") };
  const child = spawn(process.execPath, args, { detached: true, stdio: ["ignore", out, out], cwd: PKG_DIR, env });
  closeSync(out);
  child.unref();
  writeFileSync(join(DEMO_DIR, "hub.pid"), `${child.pid}\n`);
  let shown = 0;
  for (;;) {
    const text = readFileSync(logFile, "utf8");
    for (const line of text.slice(shown).split("\n").filter(Boolean)) note(`hub: ${line}`);
    shown = text.length;
    const info = readJson<DemoServices>(servicesFile);
    if (info) return info;
    if (!pidAlive(child.pid!)) throw new Error(`the hub did not start; see ${logFile}`);
    await sleep(200);
  }
}

async function provisionDemoHost(
  services: DemoServices,
  host: ThrowawayHost,
): Promise<{ stub: string; config: BootstrapConfig; pageUrl: string; hostId: string }> {
  const record = testHostRecord(host, `http://127.0.0.1:${await freePort()}`);
  const r = await fetch(`${services.hubUrl}/admin/hosts`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ record, secrets: testSecrets() }),
  });
  const body = (await r.json()) as { host_id: string; page_url: string; stub: string; config: BootstrapConfig; error?: string };
  if (r.status !== 201) throw new Error(`provisioning failed: ${r.status} ${JSON.stringify(body)}`);
  return { stub: body.stub, config: body.config, pageUrl: body.page_url, hostId: body.host_id };
}

async function up(): Promise<number> {
  const why = whyNotSupported();
  if (why) throw new Error(why);
  const hubPid = existsSync(join(DEMO_DIR, "hub.pid")) ? Number(readFileSync(join(DEMO_DIR, "hub.pid"), "utf8").trim()) : 0;
  if (existsSync(join(DEMO_DIR, "host.json")) || ThrowawayHost.list().includes(HOST_NAME) || (hubPid && pidAlive(hubPid))) {
    throw new Error(`a demo is already up; take it down first: pnpm demo down`);
  }
  mkdirSync(DEMO_DIR, { recursive: true });
  const t0 = Date.now();
  note("starting the hub and building the artifacts (cached after the first run) ...");
  // The hub and the host come up at the same time: both are slow only the first time.
  const [services, host] = await Promise.all([startServices(), ThrowawayHost.up({ name: HOST_NAME, log: note })]);
  note(`hub up at ${services.hubUrl}; host ${host.name} up (${((Date.now() - t0) / 1000).toFixed(1)} s so far)`);
  const p = await provisionDemoHost(services, host);
  const c = p.config;
  const demoHost: DemoHost = {
    name: host.name,
    hostId: p.hostId,
    pageUrl: p.pageUrl,
    statusUrl: `${p.pageUrl}status`,
    healthUrl: c.service.health_url,
    configFile: `${c.bootstrap_dir}/bootstrap-config.json`,
    bootstrapDir: c.bootstrap_dir,
    user: c.bootstrap_user,
  };
  writeFileSync(join(DEMO_DIR, "host.json"), `${JSON.stringify(demoHost, null, 2)}\n`);
  say();
  say(`Progress page: ${p.pageUrl}`);
  say();
  say(`Bootstrapping ${host.name} (the hub's stub, run as root with BOOTSTRAP_USER=${c.bootstrap_user}, like cloud-init) ...`);
  host.writeFile(STUB_PATH, p.stub, { mode: 0o700, owner: "root" });
  const code = await runStubLive(host, demoHost);
  printNextSteps(demoHost, services);
  return code;
}

/** Run the stub (already in the host) as cloud-init would, streaming its output; then the timings table. */
async function runStubLive(host: ThrowawayHost, h: DemoHost): Promise<number> {
  const started = Date.now();
  const r = await host.exec(["sh", STUB_PATH], {
    env: { BOOTSTRAP_USER: h.user },
    allowFailure: true,
    onOutput: (chunk) => process.stdout.write(chunk),
  });
  const wall = (Date.now() - started) / 1000;
  say();
  const timings = await host.exec(["python3", `${h.bootstrapDir}/bootstrap.py`, "--config", h.configFile, "timings"], {
    user: h.user,
    allowFailure: true,
  });
  say("Timings (bootstrap.py timings, inside the host):");
  say(timings.stdout.trimEnd() || timings.stderr.trimEnd());
  say();
  say(r.code === 0 ? `Bootstrap finished in ${wall.toFixed(1)} s (stub to exit).` : `Bootstrap FAILED (exit ${r.code}) after ${wall.toFixed(1)} s.`);
  return r.code === 0 ? 0 : 1;
}

/** Run the same stub again on the demo host: the idempotent re-run. */
async function rerun(): Promise<number> {
  const h = readJson<DemoHost>(join(DEMO_DIR, "host.json"));
  if (!h) throw new Error("no demo is up; start one with: pnpm demo");
  say(`Re-running the bootstrap on ${h.name} (nothing should change) ...`);
  return runStubLive(ThrowawayHost.attach(h.name), h);
}

function printNextSteps(h: DemoHost, services: DemoServices): void {
  say();
  say(`Progress page:  ${h.pageUrl}`);
  say(`Status (JSON):  ${h.statusUrl}`);
  say(`Daemon health:  ${h.healthUrl}`);
  say(`Hub:            ${services.hubUrl} (pid ${services.pid}, log ${join(DEMO_DIR, "services.log")})`);
  say();
  say("Explore the host (it shares this machine's loopback):");
  say(`  pnpm demo exec -- bash`);
  say(`  pnpm demo exec -- systemctl status cocalc-project-host`);
  say(`  pnpm demo exec -- runuser -u ${h.user} -- python3 ${h.bootstrapDir}/bootstrap.py --config ${h.configFile} status`);
  say("Run it again (nothing to do):  pnpm demo rerun");
  say();
  say("Tear it all down:  pnpm demo down");
}

function exec(args: string[]): number {
  const dash = args.indexOf("--");
  const cmd = dash >= 0 ? args.slice(dash + 1) : [];
  const host = ThrowawayHost.attach(HOST_NAME);
  const [bin, ...rest] = host.execArgv(cmd.length ? cmd : ["bash", "-l"], { env: { TERM: process.env.TERM ?? "dumb" } });
  return spawnSync(bin!, rest, { stdio: "inherit" }).status ?? 1;
}

async function down(): Promise<number> {
  if (ThrowawayHost.list().includes(HOST_NAME)) await ThrowawayHost.attach(HOST_NAME, note).down();
  const pidFile = join(DEMO_DIR, "hub.pid");
  const pid = existsSync(pidFile) ? Number(readFileSync(pidFile, "utf8").trim()) : 0;
  if (pid && pidAlive(pid)) {
    process.kill(pid, "SIGTERM");
    for (let i = 0; i < 100 && pidAlive(pid); i++) await sleep(100);
    if (pidAlive(pid)) process.kill(pid, "SIGKILL");
    note(`stopped the hub (pid ${pid})`);
  }
  rmSync(DEMO_DIR, { recursive: true, force: true });
  note("demo is down");
  return 0;
}

async function main(argv: string[]): Promise<number> {
  const [cmd = "up", ...rest] = argv;
  switch (cmd) {
    case "up":
      return up();
    case "exec":
      return exec(rest);
    case "rerun":
      return rerun();
    case "down":
      if (existsSync(DEMO_DIR) || ThrowawayHost.list().includes(HOST_NAME)) return down();
      note("no demo is up");
      return 0;
    default:
      process.stderr.write("usage: pnpm demo [up] | pnpm demo rerun | pnpm demo exec [-- CMD...] | pnpm demo down\n");
      return cmd === "--help" || cmd === "-h" ? 0 : 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    process.stderr.write(`demo: error: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(1);
  },
);
