/**
 * End-to-end, the life of a host after its first bootstrap, on one throwaway
 * host: an upgrade whose daemon fails its health check is rolled back (the
 * old version keeps serving, the hub hears why), the same bad config again
 * rolls back at once without restarting the daemon, a good upgrade swaps and
 * restarts only the daemon and prunes to keep_versions, then `bootstrap.py
 * deprovision` removes what the bootstrap installed (twice: the second finds
 * nothing) and a fresh bootstrap on the same host succeeds with the data kept.
 *
 * Needs root; SKIP_E2E=1 skips it and says why.
 */

import type { BootstrapConfig } from "@cocalc/project-host-bootstrap";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { expectServiceHealthy } from "../src/end-state.js";
import { ThrowawayHost } from "../src/host.js";
import { whyNotSupported } from "../src/machine.js";
import type { RunResult } from "../src/proc.js";
import { type BootstrapRun, type HubVariant, type ProvisionedTestHost, Testbed } from "../src/testbed.js";

const why = whyNotSupported();
const skip = process.env.SKIP_E2E === "1";
const log = (line: string) => process.stderr.write(`[e2e-lifecycle] ${line}\n`);
/** Short, so the failing upgrade costs seconds: the time the host gives a new daemon to answer. */
const HEALTH_TIMEOUT_S = 8;

if (skip) log(`skipping the lifecycle end-to-end suite: SKIP_E2E=1${why ? ` (and ${why})` : ""}`);

describe.skipIf(skip)("upgrades, rollback, prune and deprovision on one throwaway host", () => {
  let bed: Testbed;
  let host: ThrowawayHost;
  let prov: ProvisionedTestHost;
  let cold: BootstrapRun;

  const bundleDir = (c: BootstrapConfig, a: string) => `${c.bootstrap_root}/bundles/${a}`;

  async function run(p: ProvisionedTestHost, label: string): Promise<{ run: BootstrapRun; status: Awaited<ReturnType<Testbed["settledStatus"]>> }> {
    const r = await bed.bootstrap(host, p);
    const status = await bed.settledStatus(p);
    log(`${label}: exit ${r.code} in ${(r.wallMs / 1000).toFixed(1)} s (bootstrap.py ${status.wall_s?.toFixed(2) ?? "?"} s); hub says ${status.state}`);
    return { run: r, status };
  }

  const out = (r: RunResult) => `exit ${r.code}\n--- stdout\n${r.stdout.slice(-4000)}\n--- stderr\n${r.stderr.slice(-4000)}`;

  async function current(c: BootstrapConfig, a: string): Promise<string> {
    return (await host.sh(`readlink ${bundleDir(c, a)}/current`)).trim();
  }

  async function versionsOnDisk(c: BootstrapConfig, a: string): Promise<string[]> {
    const names = (await host.sh(`ls -A ${bundleDir(c, a)}`)).split("\n").filter((n) => n && n !== "current" && n !== "previous");
    return names.sort();
  }

  async function mainPid(unit: string): Promise<string> {
    return (await host.sh(`systemctl show -p MainPID --value ${unit}`)).trim();
  }

  async function activeSince(unit: string): Promise<string> {
    return (await host.sh(`systemctl show -p ActiveEnterTimestampMonotonic --value ${unit}`)).trim();
  }

  async function reprovision(variant: HubVariant): Promise<ProvisionedTestHost> {
    prov = await bed.reprovision(prov, { healthTimeoutS: HEALTH_TIMEOUT_S, ...variant });
    return prov;
  }

  /** bootstrap.py as the user, the way an operator runs it on the host. */
  function bootstrapPy(c: BootstrapConfig, args: string[]): Promise<RunResult> {
    return host.exec(["python3", `${c.bootstrap_dir}/bootstrap.py`, "--config", `${c.bootstrap_dir}/bootstrap-config.json`, ...args], {
      user: c.bootstrap_user,
      allowFailure: true,
      timeoutMs: 5 * 60_000,
    });
  }

  beforeAll(async () => {
    if (why) throw new Error(`${why}. Run the suite as root, or set SKIP_E2E=1 to skip it (reported as skipped).`);
    bed = await Testbed.start({ log });
    host = await ThrowawayHost.up({ log });
    prov = await bed.provision(host, { healthTimeoutS: HEALTH_TIMEOUT_S });
    cold = (await run(prov, "cold")).run;
  });

  afterAll(async () => {
    await host?.down().catch((e: unknown) => log(`down: ${String(e)}`));
    await bed?.close();
  });

  it("cold bootstrap: healthy on 1.0.0", async () => {
    expect(cold.code, out(cold)).toBe(0);
    expect((await expectServiceHealthy(host, prov, 60_000)).version).toBe("1.0.0");
  });

  it("an upgrade whose daemon fails its health check is rolled back: 1.0.0 serves, the failure is reported", async () => {
    const before = await expectServiceHealthy(host, prov);
    const p = await reprovision({ upgrade: { project_host: "1.1.0" }, unhealthyDaemon: true });
    const bad = await run(p, "unhealthy upgrade");
    expect(bad.run.code, out(bad.run)).toBe(1);
    // the hub hears it: the failed step, why, what to do, and the health check's own answer
    expect(bad.status.state).toBe("failed");
    const failure = bad.status.failure!;
    expect(failure.step).toBe("service");
    expect(failure.message).toMatch(/project_host 1\.1\.0 was not healthy within 8s; rolled back to 1\.0\.0, which is healthy and serving/);
    expect(failure.hint).toMatch(/Publish a fixed version/);
    expect(failure.log_tail).toMatch(/HTTP 503/);
    expect(failure.log_tail).toMatch(/broken on purpose/);
    // the console says it too (the stub's output), and the exit code is the run's failure
    expect(bad.run.stderr + bad.run.stdout).toMatch(/rolled back to 1\.0\.0/);
    // the old version serves again, from the old bundle; the new one stays installed beside it
    const after = await expectServiceHealthy(host, p, 60_000);
    expect(after.version).toBe("1.0.0");
    expect(after.pid).not.toBe(before.pid); // restarted twice: into 1.1.0, then back
    expect(await current(p.config, "project_host")).toBe("1.0.0");
    expect(await versionsOnDisk(p.config, "project_host")).toEqual(["1.0.0", "1.1.0"]);
    expect((await host.sh(`grep -c . ${p.config.bootstrap_dir}/daemon-failed.json`)).trim()).not.toBe("0");
  });

  it("the same bad config again rolls back at once, without restarting the daemon into it", async () => {
    const before = await expectServiceHealthy(host, prov);
    const again = await run(prov, "unhealthy upgrade, again");
    expect(again.run.code, out(again.run)).toBe(1);
    expect(again.status.failure?.message).toMatch(/failed before: not restarted into it again/);
    const after = await expectServiceHealthy(host, prov);
    expect(after).toEqual(before);
    expect(await current(prov.config, "project_host")).toBe("1.0.0");
  });

  it("a good upgrade swaps current and restarts only the daemon; prune keeps keep_versions (2)", async () => {
    const c0 = prov.config;
    const daemonBefore = await expectServiceHealthy(host, prov);
    const chrony = await mainPid("chrony");
    const grow = await activeSince("cocalc-grow-btrfs");
    const currentBefore = { project: await current(c0, "project"), tools: await current(c0, "tools") };
    const p = await reprovision({ upgrade: { project_host: "1.2.0" } });
    const good = await run(p, "good upgrade");
    expect(good.run.code, out(good.run)).toBe(0);
    // the closing note's figure: the whole upgrade against the bundle's own download + install
    const took = (name: string) => good.status.steps.find((s) => s.name === name)?.duration_s ?? Number.NaN;
    const own = took("download_project_host") + took("install_project_host");
    const service = took("service");
    log(
      `measure: one-bundle upgrade: stub ${(good.run.wallMs / 1000).toFixed(2)} s, bootstrap.py ${good.status.wall_s?.toFixed(2)} s; ` +
        `download+install of project_host ${own.toFixed(2)} s, service (restart + health) ${service.toFixed(2)} s, prune ${took("prune").toFixed(2)} s`,
    );
    expect(good.status.state).toBe("done");
    const after = await expectServiceHealthy(host, p, 60_000);
    expect(after.version).toBe("1.2.0");
    expect(after.pid).not.toBe(daemonBefore.pid);
    expect(await current(p.config, "project_host")).toBe("1.2.0");
    // nothing else restarted or moved
    expect(await mainPid("chrony")).toBe(chrony);
    expect(await activeSince("cocalc-grow-btrfs")).toBe(grow);
    expect({ project: await current(p.config, "project"), tools: await current(p.config, "tools") }).toEqual(currentBefore);
    // keep 2: current and the one it replaced (the last healthy one); the failed 1.1.0 is pruned
    expect(await versionsOnDisk(p.config, "project_host")).toEqual(["1.0.0", "1.2.0"]);
    expect((await host.sh(`readlink ${bundleDir(p.config, "project_host")}/previous`)).trim()).toBe("1.0.0");
    expect((await host.exec(["test", "-e", `${p.config.bootstrap_dir}/daemon-failed.json`], { allowFailure: true })).code).toBe(1);
  });

  it("deprovision removes what the bootstrap installed and keeps the data; again it finds nothing", async () => {
    const c = prov.config;
    await host.sh(`echo keep-me > ${c.btrfs.mount_point}/data/user-file && chown ${c.bootstrap_user} ${c.btrfs.mount_point}/data/user-file`);
    // keep bootstrap.py and the config for the second run: the first one removes them
    await host.sh(`install -m 0644 ${c.bootstrap_dir}/bootstrap.py ${c.bootstrap_dir}/bootstrap-config.json /var/tmp/`);
    const t0 = Date.now();
    const first = await bootstrapPy(c, ["deprovision"]);
    log(`deprovision: exit ${first.code} in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    expect(first.code, out(first)).toBe(0);
    for (const what of [
      "cocalc-project-host.service",
      "cocalc-grow-btrfs.service",
      "/usr/local/sbin/cocalc-grow-btrfs",
      "/etc/cocalc/project-host.env",
      "the tagged /btrfs line",
    ]) {
      expect(first.stdout, what).toContain(what);
    }
    expect(first.stdout).toMatch(/kept: +.*btrfs loop image/);
    const gone = [
      "/etc/systemd/system/cocalc-project-host.service",
      "/etc/systemd/system/cocalc-grow-btrfs.service",
      "/usr/local/sbin/cocalc-grow-btrfs",
      "/etc/cocalc/project-host.env",
      "/var/lib/cocalc/.bootstrap_done",
      c.bootstrap_dir,
      `${c.bootstrap_root}/bundles`,
    ];
    for (const path of gone) expect((await host.exec(["test", "-e", path], { allowFailure: true })).code, path).toBe(1);
    expect((await host.exec(["findmnt", c.btrfs.mount_point], { allowFailure: true })).code).not.toBe(0);
    expect(await host.sh("grep -c x-cocalc-bootstrap /etc/fstab || true")).toMatch(/^0/);
    expect((await host.exec(["systemctl", "is-active", "cocalc-project-host"], { allowFailure: true })).stdout.trim()).not.toBe("active");
    expect((await host.exec(["test", "-f", c.btrfs.image_path], { allowFailure: true })).code).toBe(0);
    // idempotent: the second run (from a copy of bootstrap.py and the config) removes nothing
    const second = await host.exec(["python3", "/var/tmp/bootstrap.py", "--config", "/var/tmp/bootstrap-config.json", "deprovision"], {
      user: c.bootstrap_user,
      allowFailure: true,
    });
    expect(second.code, out(second)).toBe(0);
    expect(second.stdout).toMatch(/removed: nothing/);
  });

  it("after deprovision a fresh bootstrap on the same host succeeds, and the data is still there", async () => {
    const p = await reprovision({});
    const fresh = await run(p, "fresh bootstrap after deprovision");
    expect(fresh.run.code, out(fresh.run)).toBe(0);
    expect(fresh.status.state).toBe("done");
    expect((await expectServiceHealthy(host, p, 60_000)).version).toBe("1.0.0");
    expect((await host.sh(`cat ${p.config.btrfs.mount_point}/data/user-file`)).trim()).toBe("keep-me");
  });
});
