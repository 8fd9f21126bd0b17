/**
 * End-to-end: the hub (@cocalc/server on PGlite, 127.0.0.1) provisions a
 * throwaway Debian host (debootstrap + systemd-nspawn), the package renders
 * the stub, and the stub runs inside the host as root with
 * BOOTSTRAP_USER=ubuntu, as cloud-init would. Real apt, real btrfs on a loop
 * device, a real systemd unit, real downloads from a real HTTP server.
 *
 * Needs root (debootstrap, nspawn, loop devices). Without root the suite
 * fails with the reason; SKIP_E2E=1 skips it and says why.
 *
 * Cost: the cold bootstrap runs once on host A, which the re-run and reboot
 * checks reuse; serial mode and the wrong checksum each get a fresh host.
 */
import { readFileSync, statSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { BootstrapConfig } from "@cocalc/project-host-bootstrap";
import type { HostStatus } from "@cocalc/server";
import { watchArgv } from "../src/argv-watch.js";
import { ThrowawayHost } from "../src/host.js";
import { whyNotSupported } from "../src/machine.js";
import { Testbed, type BootstrapRun, type ProvisionedTestHost } from "../src/testbed.js";

const why = whyNotSupported();
const skip = process.env.SKIP_E2E === "1";
const log = (line: string) => process.stderr.write(`[e2e] ${line}\n`);
const timings: Record<string, number> = {};

if (skip) log(`skipping the end-to-end suite: SKIP_E2E=1${why ? ` (and ${why})` : ""}`);

/** A bootstrap run with everything the assertions need afterwards. */
interface Observed {
  host: ThrowawayHost;
  prov: ProvisionedTestHost;
  run: BootstrapRun;
  argvHits: string[];
  status: HostStatus;
}

async function bootstrapObserved(bed: Testbed, host: ThrowawayHost, prov: ProvisionedTestHost, label: string): Promise<Observed> {
  const watch = watchArgv(prov.token);
  const run = await bed.bootstrap(host, prov, { onOutput: linePrefixer(`[${label}] `) });
  const { hits } = watch.stop();
  const status = await bed.settledStatus(prov);
  timings[`${label}_wall_s`] = run.wallMs / 1000;
  if (status.wall_s !== null) timings[`${label}_bootstrap_py_wall_s`] = status.wall_s;
  log(`${label}: exit ${run.code} in ${(run.wallMs / 1000).toFixed(1)} s; hub says ${status.state} ${status.percent}%`);
  return { host, prov, run, argvHits: hits, status };
}

/** Live output, one prefixed line at a time (chunks split lines anywhere). */
function linePrefixer(prefix: string): (chunk: string) => void {
  let partial = "";
  return (chunk) => {
    const lines = (partial + chunk).split("\n");
    partial = lines.pop() ?? "";
    for (const line of lines) process.stderr.write(`${prefix}${line}\n`);
  };
}

function outputOf(o: Observed): string {
  return `exit ${o.run.code}\n--- stdout (tail)\n${o.run.stdout.slice(-4000)}\n--- stderr (tail)\n${o.run.stderr.slice(-4000)}`;
}

/** KEY=value lines of an env file (values unquoted). */
function parseEnvFile(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const m = /^([A-Z_][A-Z0-9_]*)=(.*)$/.exec(line.trim());
    if (m) out[m[1]!] = m[2]!.replace(/^"(.*)"$/, "$1").replace(/^'(.*)'$/, "$1");
  }
  return out;
}

const ARTIFACTS = ["project_host", "project", "tools"] as const;

/** Everything the issue lists for a finished bootstrap; shared by the parallel and serial runs. */
async function expectBootstrappedHost(o: Observed): Promise<void> {
  const { host, prov } = o;
  const c: BootstrapConfig = prov.config;
  const user = host.lookupUser(c.bootstrap_user);

  // exit 0
  expect(o.run.code, outputOf(o)).toBe(0);

  // /btrfs: btrfs, the data subvolume, quota, tmp 1777 owned by the user
  expect((await host.sh("findmnt -n -o FSTYPE /btrfs")).trim()).toBe("btrfs");
  expect(await host.sh("btrfs subvolume list /btrfs")).toMatch(/ path data$/m);
  const qgroups = await host.exec(["btrfs", "qgroup", "show", "/btrfs"], { allowFailure: true });
  expect(qgroups.code, `quota not enabled: ${qgroups.stderr}`).toBe(0);
  expect((await host.sh("stat -c '%a %U' /btrfs/tmp")).trim()).toBe(`1777 ${c.bootstrap_user}`);
  expect((await host.sh("stat -c '%U' /btrfs/data")).trim()).toBe(c.bootstrap_user);

  // exactly one tagged, nofail fstab line for the loop image
  const fstab = host.readFile("/etc/fstab").split("\n").filter((l) => /\s\/btrfs\s/.test(l) && !l.trimStart().startsWith("#"));
  expect(fstab).toHaveLength(1);
  const [src, mnt, type, options] = fstab[0]!.trim().split(/\s+/);
  expect([src, mnt, type]).toEqual([c.btrfs.image_path, "/btrfs", "btrfs"]);
  expect(options!.split(",")).toEqual(expect.arrayContaining(["nofail", "loop", "x-cocalc-bootstrap"]));

  // the env file: content, owner root:<user's group>, mode 0640, no token
  const envPath = host.path("/etc/cocalc/project-host.env");
  const st = statSync(envPath);
  expect((st.mode & 0o777).toString(8)).toBe("640");
  expect([st.uid, st.gid]).toEqual([0, user.gid]);
  const envText = readFileSync(envPath, "utf8");
  const env = parseEnvFile(envText);
  expect(env).toMatchObject({ COCALC_HOST_ID: c.host.id, COCALC_HOST_NAME: c.host.name, COCALC_HUB_URL: c.hub.url, ...c.env });
  expect(envText).not.toContain(prov.token);

  // the bundles: bundles/<artifact>/<version> with the expected files, current -> version
  for (const a of ARTIFACTS) {
    const spec = c.artifacts[a];
    const dir = `${c.bootstrap_root}/bundles/${a}`;
    expect((await host.sh(`readlink ${dir}/current`)).trim()).toBe(spec.version);
    for (const f of spec.expected_files) expect(statSync(host.path(`${dir}/${spec.version}/${f}`)).isFile()).toBe(true);
    for (const f of spec.executables) expect(statSync(host.path(`${dir}/${spec.version}/${f}`)).mode & 0o111).not.toBe(0);
    expect((await host.sh(`stat -c %U ${dir}/${spec.version}`)).trim()).toBe(c.bootstrap_user);
  }

  // node in nvm's layout runs, as the user
  const node = `${c.home}/.nvm/versions/node/v${c.node.version}/bin/node`;
  expect((await host.sh(`${node} --version`, { user: c.bootstrap_user })).trim()).toBe(`v${c.node.version}`);
  expect((await host.sh(`${node} -e 'console.log(6*7)'`, { user: c.bootstrap_user })).trim()).toBe("42");

  // the unit is active, runs as the user, and the health URL answers (from this machine: shared loopback)
  await expectServiceHealthy(host, prov);
  expect((await host.sh("systemctl show -p User --value cocalc-project-host")).trim()).toBe(c.bootstrap_user);
  expect((await host.sh("systemctl is-enabled cocalc-project-host")).trim()).toBe("enabled");

  // the hub: done, 100 %, every step with its timing
  const s = o.status;
  expect(s.state, JSON.stringify(s.failure)).toBe("done");
  expect(s.percent).toBe(100);
  expect(s.steps.length).toBeGreaterThanOrEqual(10);
  for (const step of s.steps) {
    expect(["changed", "unchanged", "skipped"], `${step.name}: ${step.state} ${step.message}`).toContain(step.state);
    expect(step.duration_s, step.name).toEqual(expect.any(Number));
    expect(step.started_ts, step.name).toEqual(expect.any(Number));
  }

  // the log is JSON lines; the token is in no log, no file we wrote and no argv
  const records = readJsonLines(host, `${c.bootstrap_root}/logs/bootstrap.log`);
  expect(records.length).toBeGreaterThan(20);
  for (const r of records) expect(r).toMatchObject({ ts: expect.any(String), event: expect.any(String), message: expect.any(String) });
  await expectTokenNowhere(o);

  // the token file itself is the user's, 0600
  const tok = statSync(host.path(c.bootstrap_dir + "/bootstrap-token"));
  expect([(tok.mode & 0o777).toString(8), tok.uid]).toEqual(["600", user.uid]);
}

async function expectServiceHealthy(host: ThrowawayHost, prov: ProvisionedTestHost, timeoutMs = 30_000): Promise<{ pid: number; version: string }> {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  while (Date.now() < deadline) {
    const active = (await host.exec(["systemctl", "is-active", "cocalc-project-host"], { allowFailure: true })).stdout.trim();
    try {
      const r = await fetch(prov.healthUrl);
      if (active === "active" && r.status === 200) return (await r.json()) as { pid: number; version: string };
      last = `unit ${active}, health ${r.status}`;
    } catch (e) {
      last = `unit ${active}, health ${(e as Error).message}`;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`${prov.hostName}: service not healthy after ${timeoutMs} ms (${last})`);
}

function readJsonLines(host: ThrowawayHost, path: string): Record<string, unknown>[] {
  const lines = host.readFile(path).split("\n").filter((l) => l.trim() !== "");
  return lines.map((l, i) => {
    try {
      return JSON.parse(l) as Record<string, unknown>;
    } catch {
      throw new Error(`${path}:${i + 1} is not JSON: ${l.slice(0, 200)}`);
    }
  });
}

async function expectTokenNowhere(o: Observed): Promise<void> {
  const c = o.prov.config;
  expect(o.argvHits, "the token appeared in a command line").toEqual([]);
  expect(o.run.stdout + o.run.stderr).not.toContain(o.prov.token);
  // Every file under the bootstrap root except the token file, plus the journal.
  const r = await o.host.exec(
    ["grep", "-rlF", "--exclude=bootstrap-token", "-e", o.prov.token, c.bootstrap_root, "/etc/cocalc", "/etc/systemd/system", "/var/log"],
    { allowFailure: true },
  );
  expect(r.code, `token found in: ${r.stdout}`).toBe(1); // grep: 1 = no match
  const journal = await o.host.exec(["journalctl", "--no-pager", "-o", "cat"], { allowFailure: true });
  expect(journal.stdout).not.toContain(o.prov.token);
}

/** The step records of one run in bootstrap.log. */
function runRecords(host: ThrowawayHost, c: BootstrapConfig, runId: string): Record<string, unknown>[] {
  return readJsonLines(host, `${c.bootstrap_root}/logs/bootstrap.log`).filter((r) => r.run_id === runId);
}

describe.skipIf(skip)("bootstrap on a throwaway host", () => {
  let bed: Testbed;
  let a: Observed;
  const hosts: ThrowawayHost[] = [];

  async function freshHost(label: string): Promise<ThrowawayHost> {
    const t0 = Date.now();
    const host = await ThrowawayHost.up({ log });
    hosts.push(host);
    timings[`${label}_host_up_s`] = (Date.now() - t0) / 1000;
    timings[`${label}_host_boot_s`] = host.timings.bootMs / 1000;
    if (host.timings.rootfsBuildMs) timings.debootstrap_and_pack_s = host.timings.rootfsBuildMs / 1000;
    return host;
  }

  /** Free the loop device and disk early; afterAll takes down whatever is left. */
  async function takeDown(host: ThrowawayHost): Promise<void> {
    await host.down();
    hosts.splice(hosts.indexOf(host), 1);
  }

  beforeAll(async () => {
    if (why) throw new Error(`${why}. Run the suite as root, or set SKIP_E2E=1 to skip it (reported as skipped).`);
    const t0 = Date.now();
    bed = await Testbed.start({ log });
    timings.testbed_start_s = (Date.now() - t0) / 1000;
    const host = await freshHost("a");
    a = await bootstrapObserved(bed, host, await bed.provision(host), "cold");
  });

  afterAll(async () => {
    for (const h of hosts) await h.down().catch((e: unknown) => log(`down ${h.name}: ${String(e)}`));
    await bed?.close();
    log(`timings: ${JSON.stringify(timings)}`);
  });

  it("cold run (parallel) reaches the whole end state", async () => {
    await expectBootstrappedHost(a);
    expect(a.status.parallel).toBe(true);
  });

  it("re-run changes nothing: no download, no restart, every step says why it skipped", async () => {
    const before = await expectServiceHealthy(a.host, a.prov);
    const mainPid = (await a.host.sh("systemctl show -p MainPID --value cocalc-project-host")).trim();
    const requestsBefore = bed.artifactServer.requests.length;
    const again = await bootstrapObserved(bed, a.host, a.prov, "rerun");
    expect(again.run.code, outputOf(again)).toBe(0);
    expect(again.status.state).toBe("done");
    expect(again.status.run_id).not.toBe(a.status.run_id);
    // nothing fetched from the artifact server (bundles, Node, SHASUMS)
    expect(bed.artifactServer.requests.slice(requestsBefore).map((r) => r.path)).toEqual([]);
    // the daemon was not restarted
    expect((await a.host.sh("systemctl show -p MainPID --value cocalc-project-host")).trim()).toBe(mainPid);
    expect((await expectServiceHealthy(a.host, a.prov)).pid).toBe(before.pid);
    // every step unchanged, and the log says why for each
    for (const step of again.status.steps) expect(step.state, `${step.name}: ${step.message}`).not.toBe("changed");
    const records = runRecords(a.host, a.prov.config, again.status.run_id!);
    const skipped = new Set(records.filter((r) => r.event === "skip").map((r) => r.step));
    for (const step of again.status.steps) expect(skipped, `no skip record for ${step.name}`).toContain(step.name);
    for (const r of records.filter((r) => r.event === "skip")) expect(String(r.message).length).toBeGreaterThan("skipped: ".length);
    await expectTokenNowhere(again);
    timings.rerun_s = again.run.wallMs / 1000;
  });

  it("after a reboot /btrfs is back from fstab and the service is active", async () => {
    const t0 = Date.now();
    await a.host.reboot();
    timings.reboot_s = (Date.now() - t0) / 1000;
    expect((await a.host.sh("findmnt -n -o FSTYPE,SOURCE /btrfs")).trim()).toMatch(/^btrfs\s+\/dev\/loop\d+/);
    expect(await a.host.sh("btrfs subvolume list /btrfs")).toMatch(/ path data$/m);
    const health = await expectServiceHealthy(a.host, a.prov, 60_000);
    expect(health.version).toBe(a.prov.config.artifacts.project_host.version);
  });

  it("serial mode (parallel: false) reaches the same end state", async () => {
    const host = await freshHost("serial");
    const serial = await bootstrapObserved(bed, host, await bed.provision(host, { parallel: false }), "serial");
    expect(serial.prov.config.parallel).toBe(false);
    await expectBootstrappedHost(serial);
    expect(serial.status.parallel).toBe(false);
    // serially, no two steps overlap
    const spans = serial.status.steps.map((s) => [s.started_ts!, s.ended_ts!] as const).sort((x, y) => x[0] - y[0]);
    for (let i = 1; i < spans.length; i++) expect(spans[i]![0]).toBeGreaterThanOrEqual(spans[i - 1]![1] - 0.001);
    await takeDown(host);
  });

  it("a bundle with a wrong checksum fails at its download, with the hint, and nothing of it is installed", async () => {
    const host = await freshHost("badsum");
    const bad = await bootstrapObserved(bed, host, await bed.provision(host, { wrongChecksum: "project" }), "badsum");
    expect(bad.run.code, outputOf(bad)).not.toBe(0);
    expect(bad.status.state).toBe("failed");
    expect(bad.status.failure?.step).toBe("download_project");
    expect(bad.status.failure?.message ?? "").toMatch(/sha256|checksum/i);
    expect(bad.status.failure?.hint ?? "").not.toBe("");
    expect(bad.run.stdout + bad.run.stderr).toContain(bad.status.failure!.hint!.split("\n")[0]!);
    const failed = bad.status.steps.find((s) => s.name === "download_project");
    expect(failed?.state).toBe("failed");
    // nothing of the project bundle: no version directory, no current, no archive or .part left
    const c = bad.prov.config;
    const leftovers = await host.sh(`find ${c.bootstrap_root} -path '*project*' ! -path '*project_host*' ! -path '*project-host*' -print`);
    expect(leftovers.split("\n").filter((l) => /\/bundles\/project\/|project-[^/]*\.tar\.xz/.test(l))).toEqual([]);
    expect(bad.status.steps.find((s) => s.name === "install_project")?.state).toMatch(/blocked|pending/);
    await expectTokenNowhere(bad);
    await takeDown(host);
  });
});
