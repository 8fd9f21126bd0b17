/**
 * End-to-end, bundle images: the hub's manifests name a squashfs image beside
 * each archive, and the throwaway host mounts them instead of extracting
 * (its kernel mounts zstd squashfs; bootstrap.py probes it). One host goes
 * through: cold run, re-run, reboot, a one-bundle upgrade, a corrupted image,
 * and two more upgrades that prune old versions only when nothing uses them.
 * The archive path is the main e2e suite's (test/e2e.test.ts).
 *
 * Needs root; SKIP_E2E=1 skips it and says why.
 */

import type { BootstrapConfig } from "@cocalc/project-host-bootstrap";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { watchArgv } from "../src/argv-watch.js";
import {
  ARTIFACTS,
  daemonIdentity,
  expectRerunChangedNothing,
  expectServiceHealthy,
  expectTokenNowhere,
  type HostView,
  type Observed,
  outputOf,
  readJsonLines,
} from "../src/end-state.js";
import { ThrowawayHost } from "../src/host.js";
import { whyNotSupported } from "../src/machine.js";
import { type HubVariant, type ProvisionedTestHost, Testbed } from "../src/testbed.js";

/** The JSON log's records of one run (the log still carries what events do not: command details, warnings). */
function runRecords(host: HostView, c: BootstrapConfig, runId: string): Record<string, unknown>[] {
  return readJsonLines(host, `${c.bootstrap_root}/logs/bootstrap.log`).filter((r) => r.run_id === runId);
}

const why = whyNotSupported();
const skip = process.env.SKIP_E2E === "1";
const log = (line: string) => process.stderr.write(`[e2e-images] ${line}\n`);
const STORE = "/var/lib/cocalc/bundle-images";

if (skip) log(`skipping the bundle-image end-to-end suite: SKIP_E2E=1${why ? ` (and ${why})` : ""}`);

describe.skipIf(skip)("bundle images on a throwaway host", () => {
  let bed: Testbed;
  let host: ThrowawayHost;
  let prov: ProvisionedTestHost;
  let cold: Observed;

  async function run(p: ProvisionedTestHost, label: string): Promise<Observed & { fetched: string[] }> {
    const watch = watchArgv(p.token);
    const before = bed.artifactServer.requests.length;
    const r = await bed.bootstrap(host, p);
    const { hits } = watch.stop();
    const status = await bed.settledStatus(p);
    const fetched = bed.artifactServer.requests.slice(before).map((x) => x.path);
    const py = status.wall_s === null ? "" : ` (bootstrap.py ${status.wall_s.toFixed(2)} s)`;
    log(`${label}: exit ${r.code} in ${(r.wallMs / 1000).toFixed(1)} s${py}; hub says ${status.state}; fetched ${fetched.length} file(s)`);
    return { host, prov: p, run: r, argvHits: hits, status, fetched };
  }

  const bundleDir = (c: BootstrapConfig, a: string) => `${c.bootstrap_root}/bundles/${a}`;

  /** (fstype, options, source) of the mount at dir, or null. */
  async function mountAt(dir: string): Promise<{ fstype: string; options: string[]; source: string } | null> {
    const r = await host.exec(["findmnt", "-n", "-o", "FSTYPE,OPTIONS,SOURCE", "--mountpoint", dir], { allowFailure: true });
    if (r.code !== 0) return null;
    const [fstype, options, source] = r.stdout.trim().split(/\s+/);
    return { fstype: fstype!, options: options!.split(","), source: source! };
  }

  async function unitOf(dir: string): Promise<string> {
    return (await host.sh(`systemd-escape --path --suffix=mount '${dir}'`)).trim();
  }

  /** bundles/<a>/<version> is the stored, verified image, mounted read-only, nosuid, nodev, from its enabled unit. */
  async function expectMounted(c: BootstrapConfig, a: string, version: string, sha256: string): Promise<void> {
    const dir = `${bundleDir(c, a)}/${version}`;
    const m = await mountAt(dir);
    expect(m, `${dir} is not mounted`).not.toBeNull();
    expect(m!.fstype).toBe("squashfs");
    expect(m!.options).toEqual(expect.arrayContaining(["ro", "nosuid", "nodev"]));
    expect(m!.source).toMatch(/^\/dev\/loop\d+$/);
    const image = `${STORE}/${a}/${version}.sqfs`;
    expect((await host.sh(`stat -c '%a %U %G' ${image}`)).trim()).toBe("444 root root");
    expect((await host.sh(`sha256sum ${image}`)).split(" ")[0]).toBe(sha256);
    const unit = await unitOf(dir);
    expect((await host.exec(["systemctl", "is-enabled", unit], { allowFailure: true })).stdout.trim(), unit).toBe("enabled");
    expect((await host.exec(["systemctl", "is-active", unit], { allowFailure: true })).stdout.trim(), unit).toBe("active");
    // read-only: nothing extracted, nothing writable, not even by root
    expect((await host.exec(["touch", `${dir}/x`], { allowFailure: true })).code).not.toBe(0);
    expect((await host.exec(["test", "-e", `${dir}/.bootstrap-installed.json`], { allowFailure: true })).code).toBe(1);
  }

  async function expectGone(c: BootstrapConfig, a: string, version: string): Promise<void> {
    const dir = `${bundleDir(c, a)}/${version}`;
    expect(await mountAt(dir)).toBeNull();
    expect((await host.exec(["test", "-e", dir], { allowFailure: true })).code).toBe(1);
    expect((await host.exec(["test", "-e", `${STORE}/${a}/${version}.sqfs`], { allowFailure: true })).code).toBe(1);
    expect((await host.exec(["test", "-e", `/etc/systemd/system/${await unitOf(dir)}`], { allowFailure: true })).code).toBe(1);
  }

  async function current(c: BootstrapConfig, a: string, link = "current"): Promise<string> {
    return (await host.sh(`readlink ${bundleDir(c, a)}/${link}`)).trim();
  }

  /** The daemon's executable file lives on the squashfs of project_host `version`. */
  async function expectDaemonFromImage(p: ProvisionedTestHost, version: string): Promise<void> {
    const health = await expectServiceHealthy(host, p, 60_000);
    expect(health.version).toBe(version);
    const pid = (await host.sh("systemctl show -p MainPID --value cocalc-project-host")).trim();
    const cmdline = (await host.sh(`tr '\\0' ' ' < /proc/${pid}/cmdline`)).trim();
    const script = cmdline.split(" ").find((w) => w.endsWith("/cocalc-project-host"));
    expect(script, cmdline).toBeDefined();
    const real = (await host.sh(`readlink -f '${script}'`)).trim();
    expect(real).toBe(`${bundleDir(p.config, "project_host")}/${version}/cocalc-project-host`);
    expect((await host.sh(`findmnt -n -o FSTYPE --target '${real}'`)).trim()).toBe("squashfs");
  }

  async function provision(variant: HubVariant): Promise<ProvisionedTestHost> {
    prov = await bed.reprovision(prov, { images: true, ...variant });
    return prov;
  }

  beforeAll(async () => {
    if (why) throw new Error(`${why}. Run the suite as root, or set SKIP_E2E=1 to skip it (reported as skipped).`);
    bed = await Testbed.start({ log });
    host = await ThrowawayHost.up({ log });
    prov = await bed.provision(host, { images: true });
    cold = await run(prov, "images-cold");
  });

  afterAll(async () => {
    await host?.down().catch((e: unknown) => log(`down: ${String(e)}`));
    await bed?.close();
  });

  it("cold run mounts every bundle's image (no archive fetched) and the daemon runs from it", async () => {
    expect(cold.run.code, outputOf(cold)).toBe(0);
    expect(cold.status.state, JSON.stringify(cold.status.failure)).toBe("done");
    const c = prov.config;
    for (const a of ARTIFACTS) {
      const spec = c.artifacts[a];
      expect(spec.image, a).not.toBeNull();
      await expectMounted(c, a, spec.version, spec.image!.sha256);
      expect(await current(c, a)).toBe(spec.version);
      for (const f of spec.expected_files) expect((await host.sh(`cat ${bundleDir(c, a)}/current/${f} | wc -c`)).trim()).not.toBe("0");
    }
    const fetched = (cold as Observed & { fetched: string[] }).fetched;
    expect(fetched.filter((p) => p.endsWith(".sqfs"))).toHaveLength(3);
    expect(fetched.filter((p) => /\/(project-host|project|tools)-[^/]*\.tar\.xz$/.test(p))).toEqual([]);
    // the host's disk holds the compressed bytes only: no downloads left
    expect((await host.sh(`ls -A ${c.bootstrap_root}/bundles/.downloads | wc -l`)).trim()).toBe("0");
    await expectDaemonFromImage(prov, c.artifacts.project_host.version);
    const records = runRecords(host, c, cold.status.run_id!);
    expect(records.some((r) => String(r.message).includes("mounts zstd squashfs"))).toBe(true);
    await expectTokenNowhere(cold);
  });

  it("re-run changes nothing", async () => {
    const before = await daemonIdentity(host, prov);
    const again = await run(prov, "images-rerun");
    await expectRerunChangedNothing(cold, again, before, again.fetched);
  });

  it("after a reboot the images are mounted again before the daemon starts", async () => {
    await host.reboot();
    const c = prov.config;
    await expectDaemonFromImage(prov, c.artifacts.project_host.version);
    for (const a of ARTIFACTS) await expectMounted(c, a, c.artifacts[a].version, c.artifacts[a].image!.sha256);
    // ordered before the daemon: it started once, never restarted for a missing bundle
    expect((await host.sh("systemctl show -p NRestarts --value cocalc-project-host")).trim()).toBe("0");
  });

  it("an upgrade mounts the new version beside the old, swaps current and restarts the daemon on it", async () => {
    const old = prov.config.artifacts.project_host;
    const p = await provision({ upgrade: { project_host: "1.0.1" } });
    const up = await run(p, "images-upgrade");
    expect(up.run.code, outputOf(up)).toBe(0);
    const c = p.config;
    expect(c.artifacts.project_host.version).toBe("1.0.1");
    await expectMounted(c, "project_host", "1.0.1", c.artifacts.project_host.image!.sha256);
    await expectMounted(c, "project_host", old.version, old.image!.sha256); // kept: the rollback
    expect(await current(c, "project_host")).toBe("1.0.1");
    expect(await current(c, "project_host", "previous")).toBe(old.version);
    await expectDaemonFromImage(p, "1.0.1");
    expect(up.fetched.filter((x) => !x.includes("/latest-"))).toEqual([expect.stringMatching(/cocalc-project-host-1\.0\.1-amd64-linux\.sqfs$/)]);
  });

  it("a corrupted image is refused before mounting; the running version stays", async () => {
    const p = await provision({ upgrade: { project_host: "1.0.1", project: "1.0.1" }, corruptImage: "project" });
    const bad = await run(p, "images-corrupt");
    expect(bad.run.code, outputOf(bad)).not.toBe(0);
    expect(bad.status.failure?.step).toBe("download_project");
    expect(bad.status.failure?.message ?? "").toMatch(/sha256/);
    const c = p.config;
    expect(await mountAt(`${bundleDir(c, "project")}/1.0.1`)).toBeNull();
    expect((await host.exec(["test", "-e", `${STORE}/project/1.0.1.sqfs`], { allowFailure: true })).code).toBe(1);
    expect(await current(c, "project")).toBe("1.0.0");
    await expectMounted(c, "project", "1.0.0", cold.prov.config.artifacts.project.image!.sha256);
    await expectDaemonFromImage(p, "1.0.1");
  });

  it("old versions are pruned (unmounted, unit and image removed) only when nothing uses them", async () => {
    const c0 = prov.config;
    const v100 = `${bundleDir(c0, "project_host")}/1.0.0`;
    // something still works in 1.0.0: it is not pruned
    await host.sh(`systemd-run --unit=holds-1-0-0 -p WorkingDirectory=${v100} sleep 600`);
    let p = await provision({ upgrade: { project_host: "1.0.2" } });
    const second = await run(p, "images-upgrade-2");
    expect(second.run.code, outputOf(second)).toBe(0);
    await expectDaemonFromImage(p, "1.0.2");
    const sha102 = p.config.artifacts.project_host.image!.sha256;
    expect(await mountAt(v100)).not.toBeNull();
    const warned = runRecords(host, p.config, second.status.run_id!).some((r) => /1\.0\.0 is in use/.test(String(r.message)));
    expect(warned).toBe(true);
    // nothing uses it any more: the next upgrade prunes it, and 1.0.1 (neither current nor previous)
    await host.sh("systemctl stop holds-1-0-0");
    p = await provision({ upgrade: { project_host: "1.0.3" } });
    const third = await run(p, "images-upgrade-3");
    expect(third.run.code, outputOf(third)).toBe(0);
    await expectDaemonFromImage(p, "1.0.3");
    await expectGone(p.config, "project_host", "1.0.0");
    await expectGone(p.config, "project_host", "1.0.1");
    await expectMounted(p.config, "project_host", "1.0.2", sha102);
    expect(await current(p.config, "project_host", "previous")).toBe("1.0.2");
  });
});
