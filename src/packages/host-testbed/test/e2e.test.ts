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
 * Cost: the cold bootstrap runs once on host A, which the re-run (also with
 * state.json removed) and reboot checks reuse; serial mode and the wrong
 * checksum each get a fresh host.
 *
 * E2E_SUITE (bookworm, the default, or trixie) and E2E_ARCH (this machine's
 * arch, the default, or arm64 emulated with qemu-user-static) choose the
 * hosts' Debian release and arch; scripts/test.sh runs both releases, and
 * `pnpm test:arm64` the whole suite on arm64.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { watchArgv } from "../src/argv-watch.js";
import {
  daemonIdentity,
  expectBootstrappedHost,
  expectRerunChangedNothing,
  expectServiceHealthy,
  expectTokenNowhere,
  type Observed,
  outputOf,
} from "../src/end-state.js";
import { ThrowawayHost } from "../src/host.js";
import { nativeDebianArch, whyNotSupported } from "../src/machine.js";
import { e2eTarget } from "../src/targets.js";
import { type ProvisionedTestHost, Testbed } from "../src/testbed.js";

const target = e2eTarget();
/** Emulated (arm64 on amd64), a cold rootfs is debootstrapped under qemu: tens of minutes. */
const SETUP_TIMEOUT_MS = target.arch === nativeDebianArch() ? 600_000 : 60 * 60_000;
const why = whyNotSupported();
const skip = process.env.SKIP_E2E === "1";
const log = (line: string) => process.stderr.write(`[e2e] ${line}\n`);
const timings: Record<string, number> = {};

if (skip) log(`skipping the end-to-end suite: SKIP_E2E=1${why ? ` (and ${why})` : ""}`);
else log(`hosts: Debian ${target.suite} ${target.arch}`);

async function bootstrapObserved(bed: Testbed, host: ThrowawayHost, prov: ProvisionedTestHost, label: string): Promise<Observed & { host: ThrowawayHost }> {
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

describe.skipIf(skip)(`bootstrap on a throwaway host (${target.suite}, ${target.arch})`, () => {
  let bed: Testbed;
  let a: Observed & { host: ThrowawayHost };
  const hosts: ThrowawayHost[] = [];

  async function freshHost(label: string): Promise<ThrowawayHost> {
    const t0 = Date.now();
    const host = await ThrowawayHost.up({ log, rootfs: { suite: target.suite, arch: target.arch } });
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
    bed = await Testbed.start({ log, arch: target.arch, os: target.os });
    timings.testbed_start_s = (Date.now() - t0) / 1000;
    const host = await freshHost("a");
    a = await bootstrapObserved(bed, host, await bed.provision(host), "cold");
  }, SETUP_TIMEOUT_MS);

  afterAll(async () => {
    for (const h of hosts) await h.down().catch((e: unknown) => log(`down ${h.name}: ${String(e)}`));
    await bed?.close();
    log(`timings (${target.suite} ${target.arch}): ${JSON.stringify(timings)}`);
  });

  it("cold run (parallel) reaches the whole end state", async () => {
    await expectBootstrappedHost(a);
    expect(a.status.parallel).toBe(true);
  });

  it("re-run changes nothing: no download, no restart, every step says why it skipped", async () => {
    const before = await daemonIdentity(a.host, a.prov);
    const requestsBefore = bed.artifactServer.requests.length;
    const again = await bootstrapObserved(bed, a.host, a.prov, "rerun");
    await expectRerunChangedNothing(
      a,
      again,
      before,
      bed.artifactServer.requests.slice(requestsBefore).map((r) => r.path),
    );
    timings.rerun_s = again.run.wallMs / 1000;
  });

  it("with state.json removed, a re-run applies every step to be sure and changes nothing", async () => {
    const c = a.prov.config;
    await a.host.sh(`rm ${c.bootstrap_dir}/state.json`);
    const before = await daemonIdentity(a.host, a.prov);
    const requestsBefore = bed.artifactServer.requests.length;
    const again = await bootstrapObserved(bed, a.host, a.prov, "state_lost");
    await expectRerunChangedNothing(
      a,
      again,
      before,
      bed.artifactServer.requests.slice(requestsBefore).map((r) => r.path),
      { stateLost: true },
    );
    // state.json is back, with a fingerprint for every step and nothing else
    const state = JSON.parse(a.host.readFile(`${c.bootstrap_dir}/state.json`)) as { version: number; steps: Record<string, { fingerprint: string }> };
    expect(Object.keys(state).sort()).toEqual(["steps", "version"]);
    expect(Object.keys(state.steps).sort()).toEqual(again.status.steps.map((s) => s.name).sort());
    timings.state_lost_rerun_s = again.run.wallMs / 1000;
  });

  it("after a reboot /btrfs is back from fstab and the service is active", async () => {
    const t0 = Date.now();
    await a.host.reboot();
    timings.reboot_s = (Date.now() - t0) / 1000;
    expect((await a.host.sh("findmnt -n -o FSTYPE,SOURCE /btrfs")).trim()).toMatch(/^btrfs\s+\/dev\/loop\d+/);
    expect((await a.host.btrfs(["subvolume", "list"], "/btrfs")).stdout).toMatch(/ path data$/m);
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
