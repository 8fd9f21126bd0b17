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

import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
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
  parseEnvFile,
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

/** The size btrfs gives its (one) device, from `btrfs filesystem show --raw`. */
function btrfsDeviceSize(show: string): number {
  const m = /devid\s+\d+\s+size\s+(\d+)/.exec(show);
  if (!m) throw new Error(`no device size in: ${show}`);
  return Number(m[1]);
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

  it("the user runs a rootless container (image from a local tarball) with its storage on /btrfs", async () => {
    const user = a.prov.config.bootstrap_user;
    // A tiny image without a registry: Debian's static busybox in a tarball, imported by podman.
    await a.host.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >/dev/null", { timeoutMs: 300_000 });
    await a.host.sh(
      "rm -rf /tmp/tiny && mkdir -p /tmp/tiny/bin && cp /bin/busybox /tmp/tiny/bin/ && tar -C /tmp/tiny -cf /tmp/tiny.tar . && chmod 644 /tmp/tiny.tar",
    );
    const t0 = Date.now();
    await a.host.sh("cd /tmp && podman import -q /tmp/tiny.tar localhost/tiny:1", { user, timeoutMs: 120_000 });
    const ran = await a.host.exec(["sh", "-c", "cd /tmp && podman run --rm localhost/tiny:1 /bin/busybox sh -c 'echo hello from $(id -u) in a container'"], {
      user,
      timeoutMs: 120_000,
      allowFailure: true,
    });
    timings.rootless_container_s = (Date.now() - t0) / 1000;
    expect(ran.code, ran.stderr).toBe(0);
    expect(ran.stdout.trim()).toBe("hello from 0 in a container"); // root inside, the user outside
    const info = (await a.host.sh("cd /tmp && podman info --format '{{.Store.GraphRoot}} {{.Store.RunRoot}} {{.Store.GraphDriverName}}'", { user })).trim();
    expect(info).toBe(`/btrfs/data/containers/rootless/${user}/storage /btrfs/data/containers/rootless/${user}/run overlay`);
    // the layers really are on /btrfs
    expect((await a.host.sh(`findmnt -n -o TARGET --target /btrfs/data/containers/rootless/${user}/storage`)).trim()).toBe("/btrfs");
    const rootful = (await a.host.sh("podman info --format '{{.Store.GraphRoot}}'")).trim();
    expect(rootful).toBe("/btrfs/data/containers/root/storage");
  });

  it("cocalc-grow-btrfs N grows the loop image, the filesystem and the recorded size; root only", async () => {
    const c = a.prov.config;
    const size = async () => btrfsDeviceSize(await a.host.sh("btrfs filesystem show --raw /btrfs"));
    const before = await size();
    const asUser = await a.host.exec(["/usr/local/sbin/cocalc-grow-btrfs", "9"], { user: c.bootstrap_user, allowFailure: true });
    expect(asUser.code).not.toBe(0);
    expect(asUser.stderr).toMatch(/as root/);
    const grownTo = c.btrfs.image_size_gb + 1;
    const out = await a.host.sh(`/usr/local/sbin/cocalc-grow-btrfs ${grownTo}`);
    expect(out).toMatch(/\/btrfs/); // df
    expect(await size()).toBe(grownTo * 2 ** 30);
    expect(await size()).toBeGreaterThan(before);
    expect(parseEnvFile(a.host.readFile("/etc/cocalc/project-host.env")).COCALC_BTRFS_IMAGE_GB).toBe(String(grownTo));
    // never shrinks; without an argument it only fills the device (what the boot unit runs)
    await a.host.sh(`/usr/local/sbin/cocalc-grow-btrfs 1 && systemctl restart cocalc-grow-btrfs.service`);
    expect(await size()).toBe(grownTo * 2 ** 30);
    expect((await a.host.sh("systemctl is-active cocalc-grow-btrfs.service")).trim()).toBe("active");
  });

  it("tunnel: the pinned cloudflared .deb runs as cocalc-cloudflared, the token only in its root 0600 env file; restarted when it dies", async () => {
    const c = a.prov.config;
    const cf = bed.site.cloudflared!;
    const token = a.prov.tunnelToken;
    const config = {
      ...c,
      cloudflared: {
        deb: { url: cf.url, sha256: cf.sha256, version: cf.version, size_bytes: cf.size_bytes },
        hostname: `${c.host.name}.tunnel.example.org`,
        port: 9002,
        token_secret: "cloudflared-token",
      },
    };
    const configPath = `${c.bootstrap_dir}/tunnel-test-config.json`;
    a.host.writeFile(configPath, JSON.stringify(config), { mode: 0o600, owner: c.bootstrap_user });
    const watch = watchArgv(token);
    const r = await a.host.exec(["python3", `${c.bootstrap_dir}/bootstrap.py`, "--config", configPath, "run", "--only", "tunnel"], {
      user: c.bootstrap_user,
      allowFailure: true,
      timeoutMs: 300_000,
    });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect((await a.host.sh("systemctl is-active cocalc-cloudflared; systemctl show -p Restart --value cocalc-cloudflared")).trim().split("\n")).toEqual([
      "active",
      "always",
    ]);
    expect((await a.host.sh("dpkg-query -W -f '${Version}' cloudflared")).trim()).toBe(cf.version);
    expect((await a.host.sh("stat -c '%a %U' /etc/cloudflared/token.env")).trim()).toBe("600 root");
    expect(a.host.readFile("/etc/cloudflared/token.env")).toBe(`TUNNEL_TOKEN=${token}\n`);
    expect(a.host.readFile("/etc/cloudflared/config.yml")).toContain(
      `  - hostname: ${config.cloudflared.hostname}\n    service: http://localhost:9002\n  - service: http_status:404\n`,
    );
    const runs = () =>
      a.host
        .readFile("/var/lib/cloudflared-standin/runs.jsonl")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l) as { pid: number; argv: string[]; token_sha256: string | null });
    const first = runs().at(-1)!;
    expect(first.argv).toEqual(["--no-autoupdate", "--config", "/etc/cloudflared/config.yml", "tunnel", "run"]);
    expect(first.token_sha256).toBe(createHash("sha256").update(token).digest("hex"));
    // Restart=always: killed, it comes back (RestartSec=5)
    const mainPid = (await a.host.sh("systemctl show -p MainPID --value cocalc-cloudflared")).trim();
    await a.host.sh(`kill -9 ${mainPid}`);
    const deadline = Date.now() + 20_000;
    while (Date.now() < deadline && runs().length < 2) await new Promise((res) => setTimeout(res, 250));
    expect(runs().length).toBe(2);
    expect((await a.host.sh("systemctl is-active cocalc-cloudflared")).trim()).toBe("active");
    // the token: in no command line (watched all along), no ps output, no log, no journal, no other file
    expect(watch.stop().hits).toEqual([]);
    expect(await a.host.sh("ps -eo args")).not.toContain(token);
    expect(r.stdout + r.stderr).not.toContain(token);
    const grep = await a.host.exec(
      ["grep", "-rlF", "--exclude=token.env", "-e", token, c.bootstrap_root, "/etc", "/var/log", "/var/lib/cloudflared-standin", "/btrfs/data"],
      {
        allowFailure: true,
      },
    );
    expect(grep.code, `token found in: ${grep.stdout}`).toBe(1);
    expect((await a.host.exec(["journalctl", "--no-pager", "-o", "cat"])).stdout).not.toContain(token);
  });

  // Last on host A: it points the btrfs step (alone, --only btrfs) at extra loop devices under
  // /btrfs-disk, which rewrites host A's tagged fstab line and grow helper.
  it("data disk: ext4 refused untouched; too small and never there fail after the wait; blank formatted by UUID; btrfs reused; device grows", async () => {
    const c = a.prov.config;
    const user = c.bootstrap_user;
    const dir = "/var/tmp/disks";
    await a.host.sh(`mkdir -p ${dir} && truncate -s 1G ${dir}/blank.img ${dir}/ext4.img && truncate -s 512M ${dir}/small.img`);
    const attach = async (img: string) => (await a.host.sh(`losetup -f --show ${dir}/${img}`)).trim();
    const [blank, ext4, small] = [await attach("blank.img"), await attach("ext4.img"), await attach("small.img")];
    // Formatted from this machine: the loop device is the same kernel object, and a minimal
    // trixie host has no e2fsprogs.
    execFileSync("sh", ["-c", `mkfs.ext4 -q ${ext4} && d=$(mktemp -d) && mount ${ext4} "$d" && echo precious > "$d/file" && umount "$d" && rmdir "$d"`]);
    const ext4Before = await a.host.sh(`blkid -p -o value -s UUID ${ext4}; sha256sum ${ext4}`);
    const configPath = `${c.bootstrap_dir}/disk-test-config.json`;
    const runBtrfs = async (candidates: string[], waitS: number) => {
      const config = {
        ...c,
        btrfs: { ...c.btrfs, mount_point: "/btrfs-disk", data_disk: { candidates, min_size_gb: 1, wait_s: waitS } },
      };
      a.host.writeFile(configPath, JSON.stringify(config), { mode: 0o600, owner: user });
      const t0 = Date.now();
      const r = await a.host.exec(["python3", `${c.bootstrap_dir}/bootstrap.py`, "--config", configPath, "run", "--only", "btrfs"], {
        user,
        allowFailure: true,
        timeoutMs: 180_000,
      });
      return { ...r, out: r.stdout + r.stderr, wallS: (Date.now() - t0) / 1000 };
    };

    const refusedExt4 = await runBtrfs([ext4], 2);
    expect(refusedExt4.code, refusedExt4.out).not.toBe(0);
    expect(refusedExt4.out).toMatch(/holds ext4; refusing to format it/);
    expect(await a.host.sh(`blkid -p -o value -s UUID ${ext4}; sha256sum ${ext4}`)).toBe(ext4Before);

    const tooSmall = await runBtrfs([small], 2);
    expect(tooSmall.code, tooSmall.out).not.toBe(0);
    expect(tooSmall.out).toMatch(/less than the minimum 1 GiB/);
    expect(tooSmall.out).toMatch(/Attach the data disk/); // the hint
    expect(await a.host.exec(["blkid", "-p", small], { allowFailure: true }).then((r) => r.code)).toBe(2); // still blank

    const never = await runBtrfs(["/dev/disk/by-id/google-nothing-data"], 3);
    expect(never.code, never.out).not.toBe(0);
    expect(never.out).toMatch(/no usable data disk within 3s: \/dev\/disk\/by-id\/google-nothing-data: not there/);
    expect(never.out).toMatch(/Attach the data disk/);
    expect(never.wallS).toBeGreaterThanOrEqual(3);

    const formatted = await runBtrfs(["/dev/disk/by-id/google-nothing-data", small, blank], 5);
    expect(formatted.code, formatted.out).toBe(0);
    const uuid = (await a.host.sh(`blkid -p -o value -s UUID ${blank}`)).trim();
    expect((await a.host.sh("findmnt -n -o FSTYPE,SOURCE /btrfs-disk")).trim().split(/\s+/)).toEqual(["btrfs", blank]);
    const tagged = a.host
      .readFile("/etc/fstab")
      .split("\n")
      .filter((l) => l.includes("x-cocalc-bootstrap") && !l.startsWith("#"));
    expect(tagged).toHaveLength(1);
    expect(tagged[0]!.split(/\s+/).slice(0, 3)).toEqual([`UUID=${uuid}`, "/btrfs-disk", "btrfs"]);
    expect(tagged[0]).toMatch(/nofail/);

    await a.host.sh(`echo kept > /btrfs-disk/data/keep.txt && umount /btrfs-disk`);
    const reused = await runBtrfs([blank], 5);
    expect(reused.code, reused.out).toBe(0);
    expect(reused.out).toMatch(/already holds btrfs; reusing it/);
    expect((await a.host.sh("cat /btrfs-disk/data/keep.txt")).trim()).toBe("kept");
    expect((await a.host.sh(`blkid -p -o value -s UUID ${blank}`)).trim()).toBe(uuid);

    // the disk grows (as a provider resizes it); cocalc-grow-btrfs fills it
    const size = async () => btrfsDeviceSize(await a.host.sh("btrfs filesystem show --raw /btrfs-disk"));
    expect(await size()).toBe(2 ** 30);
    await a.host.sh(`truncate -s 2G ${dir}/blank.img && losetup -c ${blank}`);
    const grown = await a.host.exec(["/usr/local/sbin/cocalc-grow-btrfs", "5"], { allowFailure: true });
    expect(grown.code, grown.stderr).toBe(0);
    expect(grown.stderr).toMatch(/on a disk: grow the disk itself/);
    expect(await size()).toBe(2 * 2 ** 30);
    await a.host.sh(`umount /btrfs-disk; losetup -d ${blank} ${ext4} ${small}`);
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
