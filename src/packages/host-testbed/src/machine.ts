/**
 * What the machine that runs the testbed needs: root, the tools
 * (debootstrap, systemd-nspawn, nsenter, zstd, xz) and loop devices
 * /dev/loop0..15 to bind into the hosts.
 */
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { haveCommand, run } from "./proc.js";

/** Debian packages that provide the commands the testbed runs. */
export const MACHINE_PACKAGES: Record<string, string> = {
  debootstrap: "debootstrap",
  "systemd-nspawn": "systemd-container",
  nsenter: "util-linux",
  losetup: "mount",
  zstd: "zstd",
  xz: "xz-utils",
  tar: "tar",
};

/** Bound into every host: btrfs takes one, each mounted bundle image one more (two while upgrading). */
export const LOOP_DEVICES = 16;

export function isRoot(): boolean {
  return typeof process.getuid === "function" && process.getuid() === 0;
}

/** Why this machine cannot run throwaway hosts, or null when it can. */
export function whyNotSupported(): string | null {
  if (process.platform !== "linux") return `throwaway hosts need Linux (this is ${process.platform})`;
  if (!isRoot()) return "throwaway hosts need root (debootstrap, systemd-nspawn, loop devices); run as root";
  return null;
}

/** Install missing tools with apt-get (update first only if the install fails). */
export async function ensureMachinePackages(log: (line: string) => void = () => {}): Promise<void> {
  const missing = new Set<string>();
  for (const [cmd, pkg] of Object.entries(MACHINE_PACKAGES)) {
    if (!(await haveCommand(cmd))) missing.add(pkg);
  }
  if (missing.size === 0) return;
  const pkgs = [...missing].sort();
  log(`installing on this machine: ${pkgs.join(" ")}`);
  const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
  const install = ["apt-get", "install", "-y", "--no-install-recommends", ...pkgs];
  const first = await run(install, { env, allowFailure: true, timeoutMs: 600_000 });
  if (first.code === 0) return;
  await run(["apt-get", "update"], { env, timeoutMs: 600_000 });
  await run(install, { env, timeoutMs: 600_000 });
}

export interface LoopDevice {
  name: string; // loop3
  path: string; // /dev/loop3
  backingFile: string | null;
}

/** Make /dev/loop-control and /dev/loop0..<LOOP_DEVICES - 1> exist (block major 7). */
export async function ensureLoopDeviceNodes(): Promise<void> {
  if (!existsSync("/dev/loop-control")) await run(["modprobe", "loop"], { allowFailure: true });
  if (!existsSync("/dev/loop-control")) await run(["mknod", "-m", "0660", "/dev/loop-control", "c", "10", "237"]);
  for (let i = 0; i < LOOP_DEVICES; i++) {
    const path = `/dev/loop${i}`;
    if (!existsSync(path)) await run(["mknod", "-m", "0660", path, "b", "7", String(i)]);
  }
}

export function loopDevices(): LoopDevice[] {
  const out: LoopDevice[] = [];
  let names: string[] = [];
  try {
    names = readdirSync("/sys/block").filter((n) => /^loop\d+$/.test(n));
  } catch {
    return out;
  }
  for (const name of names) {
    let backingFile: string | null = null;
    try {
      backingFile = readFileSync(join("/sys/block", name, "loop", "backing_file"), "utf8").trim();
    } catch {
      // no loop/ directory: not attached
    }
    out.push({ name, path: `/dev/${name}`, backingFile });
  }
  return out;
}

/**
 * Detach every loop device whose backing file lives inside `root`. The
 * kernel reports the path as seen from the namespace that attached it (the
 * container's), so a path is tried both as-is and relative to `root`, and
 * then matched by inode.
 */
export async function detachLoopsUnder(root: string): Promise<string[]> {
  const detached: string[] = [];
  for (const dev of await attachedLoops()) {
    if (!backingFileIsUnder(dev, root)) continue;
    await run(["losetup", "-d", dev.path], { allowFailure: true });
    detached.push(`${dev.path} (${dev.backingFile})`);
  }
  return detached;
}

interface AttachedLoop {
  path: string;
  backingFile: string;
  backingInode: number;
}

async function attachedLoops(): Promise<AttachedLoop[]> {
  const r = await run(["losetup", "--json", "--list", "-O", "NAME,BACK-FILE,BACK-INO"], { allowFailure: true });
  if (r.code !== 0 || !r.stdout.trim()) return [];
  const parsed = JSON.parse(r.stdout) as { loopdevices?: Record<string, string | number | null>[] };
  return (parsed.loopdevices ?? []).map((d) => ({
    path: String(d.name),
    backingFile: String(d["back-file"] ?? ""),
    backingInode: Number(d["back-ino"]),
  }));
}

function backingFileIsUnder(dev: AttachedLoop, root: string): boolean {
  const clean = dev.backingFile.replace(/ \(deleted\)$/, "");
  if (clean === root || clean.startsWith(`${root}/`)) return true;
  try {
    return statSync(join(root, clean)).ino === dev.backingInode;
  } catch {
    return false;
  }
}

/** Loop devices 0..<LOOP_DEVICES - 1> that are attached to something (the hosts get these bound in). */
export function busyBoundLoops(): LoopDevice[] {
  return loopDevices().filter((d) => d.backingFile !== null && Number(d.name.slice(4)) < LOOP_DEVICES);
}

/** binfmt_misc names and qemu arch names for the Debian arches a host may have. */
const QEMU_ARCH: Record<string, string> = { arm64: "aarch64", amd64: "x86_64" };
const BINFMT = "/proc/sys/fs/binfmt_misc";

/** This machine's Debian arch. */
export function nativeDebianArch(): string {
  return process.arch === "arm64" ? "arm64" : process.arch === "x64" ? "amd64" : process.arch;
}

/**
 * Make this machine run `arch` binaries (a foreign-arch rootfs: debootstrap's
 * second stage, then the booted host): qemu-user-static and its binfmt_misc
 * entry, registered with the F flag (the interpreter is opened now, so it
 * works inside the host's root too). Nothing to do for the native arch.
 */
export async function ensureForeignArch(arch: string, log: (line: string) => void = () => {}): Promise<void> {
  if (arch === nativeDebianArch()) return;
  const qemu = QEMU_ARCH[arch];
  if (!qemu) throw new Error(`rootfs arch '${arch}': this testbed emulates only ${Object.keys(QEMU_ARCH).join(", ")}`);
  const entry = join(BINFMT, `qemu-${qemu}`);
  if (!existsSync(join(BINFMT, "register"))) {
    const r = await run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT], { allowFailure: true });
    if (r.code !== 0) throw new Error(`cannot mount binfmt_misc on ${BINFMT} (${r.stderr.trim()}): arch ${arch} needs it to run emulated`);
  }
  let conf = binfmtConf(qemu);
  if (!conf) {
    log(`installing qemu-user-static (to run ${arch} hosts)`);
    const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
    await run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "--no-install-recommends", "qemu-user-static"], { env, timeoutMs: 600_000 });
    conf = binfmtConf(qemu);
    if (!conf) throw new Error(`qemu-user-static installed no /usr/lib/binfmt.d/qemu-${qemu}*.conf; cannot run ${arch} binaries`);
  }
  const existing = existsSync(entry) ? readFileSync(entry, "utf8") : null;
  if (existing !== null && !/^flags:.*C/m.test(existing)) {
    // Registered without C (credentials from the binary): setuid binaries such
    // as sudo would run unprivileged in the host. Register it again with C.
    log(`${entry} lacks the C flag (setuid, e.g. sudo, would not work in ${arch} hosts); registering it again`);
    await run(["sh", "-c", 'echo -1 > "$1"', "sh", entry], { allowFailure: true });
  }
  if (!existsSync(entry)) {
    log(`registering ${conf} with binfmt_misc (flags + C)`);
    const line = withCredentialsFlag(readFileSync(conf, "utf8").trim());
    const r = await run(["sh", "-c", 'printf "%s" "$1" > "$2"', "sh", line, join(BINFMT, "register")], { allowFailure: true });
    // Another process may have registered it in between: only the end state matters.
    if (r.code !== 0 && !existsSync(entry)) throw new Error(`cannot register ${conf} with binfmt_misc: ${r.stderr.trim()}`);
  }
  const status = readFileSync(entry, "utf8");
  if (!/^enabled$/m.test(status)) throw new Error(`${entry} is disabled; enable it: echo 1 > ${entry}`);
  for (const [flag, why] of [
    ["F", `${arch} binaries cannot run inside a host root`],
    ["C", `setuid binaries (sudo) run unprivileged in ${arch} hosts`],
  ] as const) {
    if (!new RegExp(`^flags:.*${flag}`, "m").test(status))
      throw new Error(`${entry} lacks the ${flag} flag, so ${why}; unregister it (echo -1 > ${entry}) and run again`);
  }
}

/**
 * A binfmt.d line (`:name:type:offset:magic:mask:interpreter:flags`) with the
 * C flag (credentials and security token from the binary, not the
 * interpreter: setuid works), which implies O.
 */
export function withCredentialsFlag(line: string): string {
  const fields = line.split(":");
  if (fields.length !== 8) throw new Error(`not a binfmt_misc registration line: ${JSON.stringify(line)}`);
  const flags = fields[7]!;
  if (!flags.includes("C")) fields[7] = `${flags}C`;
  return fields.join(":");
}

/** The binfmt.d file qemu-user-static ships for `qemu` (with the F flag), or null. */
function binfmtConf(qemu: string): string | null {
  const dir = "/usr/lib/binfmt.d";
  let names: string[] = [];
  try {
    names = readdirSync(dir);
  } catch {
    return null;
  }
  const name = names.filter((n) => n === `qemu-${qemu}.conf` || n === `qemu-${qemu}-static.conf`).sort()[0];
  if (!name) return null;
  const path = join(dir, name);
  const interpreter = readFileSync(path, "utf8").trim().split(":")[6];
  return interpreter && existsSync(interpreter) ? path : null;
}
