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

/** Make /dev/loop-control and /dev/loop0..15 exist (block major 7). */
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
  if (clean === root || clean.startsWith(root + "/")) return true;
  try {
    return statSync(join(root, clean)).ino === dev.backingInode;
  } catch {
    return false;
  }
}

/** Loop devices 0..7 that are attached to something (the hosts get these bound in). */
export function busyBoundLoops(): LoopDevice[] {
  return loopDevices().filter((d) => d.backingFile !== null && Number(d.name.slice(4)) < LOOP_DEVICES);
}
