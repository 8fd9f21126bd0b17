/**
 * The Debian root filesystem every throwaway host starts from: made once
 * with debootstrap, customised (user, sudo, apt sources), packed as a zstd
 * tarball in the cache and unpacked per host. The cache key covers
 * everything that shapes the tarball, so changing the package list or the
 * recipe builds a new one.
 */
import { createHash } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { debianMirror, sourcesListFor } from "./apt-sources.js";
import { nativeDebianArch } from "./machine.js";
import { cacheDir } from "./paths.js";
import { run } from "./proc.js";

/** Bump when the customisation below changes, so old tarballs are not reused. */
const RECIPE_VERSION = 2;

export const DEFAULT_SUITE = "bookworm";
export const DEFAULT_USER = "ubuntu";
/** What a cloud VM image has that the bootstrap relies on (minbase has none of it). */
export const BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "sudo", "python3", "ca-certificates", "curl", "iproute2", "procps", "less"];

export interface RootfsSpec {
  suite: string;
  arch: string;
  mirror: string;
  packages: string[];
  user: string;
  sourcesList: string;
}

export function defaultRootfsSpec(overrides: Partial<RootfsSpec> = {}): RootfsSpec {
  const suite = overrides.suite ?? DEFAULT_SUITE;
  return {
    suite,
    arch: overrides.arch ?? debianArch(),
    mirror: overrides.mirror ?? debianMirror(suite),
    packages: [...(overrides.packages ?? BASE_PACKAGES)].sort(),
    user: overrides.user ?? DEFAULT_USER,
    sourcesList: overrides.sourcesList ?? sourcesListFor(suite),
  };
}

export function debianArch(): string {
  return nativeDebianArch();
}

export function rootfsKey(spec: RootfsSpec): string {
  return createHash("sha256")
    .update(JSON.stringify({ RECIPE_VERSION, ...spec }))
    .digest("hex")
    .slice(0, 16);
}

export function rootfsTarball(spec: RootfsSpec): string {
  return join(cacheDir(), "rootfs", `${spec.suite}-${spec.arch}-${rootfsKey(spec)}.tar.zst`);
}

export interface RootfsBuildReport {
  tarball: string;
  cached: boolean;
  debootstrapMs: number;
  packMs: number;
}

/** The cached tarball for `spec`, building it first when it is missing. */
export async function ensureRootfsTarball(spec: RootfsSpec, log: (line: string) => void = () => {}): Promise<RootfsBuildReport> {
  const tarball = rootfsTarball(spec);
  if (existsSync(tarball)) return { tarball, cached: true, debootstrapMs: 0, packMs: 0 };
  mkdirSync(join(cacheDir(), "rootfs"), { recursive: true });
  // Two processes (a test and the benchmark, say) would debootstrap twice, each half as fast.
  const release = await buildLock(`${tarball}.lock`, log);
  try {
    if (existsSync(tarball)) return { tarball, cached: true, debootstrapMs: 0, packMs: 0 };
    return await buildRootfs(spec, tarball, log);
  } finally {
    release();
  }
}

/**
 * A lock directory holding the builder's PID; a lock whose builder is gone
 * is taken over. (mkdir is atomic; Node has no flock.)
 */
async function buildLock(lockDir: string, log: (line: string) => void): Promise<() => void> {
  let announced = false;
  for (;;) {
    try {
      mkdirSync(lockDir);
      writeFileSync(join(lockDir, "pid"), `${process.pid}\n`);
      return () => rmSync(lockDir, { recursive: true, force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
    }
    const holder = Number(readFileOr(join(lockDir, "pid")).trim());
    if (holder && !processAlive(holder)) {
      rmSync(lockDir, { recursive: true, force: true });
      continue;
    }
    if (!announced) log(`waiting for process ${holder || "?"} to finish building the same rootfs ...`);
    announced = true;
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function readFileOr(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function buildRootfs(spec: RootfsSpec, tarball: string, log: (line: string) => void): Promise<RootfsBuildReport> {
  const work = join(cacheDir(), "rootfs", `build-${rootfsKey(spec)}-${process.pid}`);
  rmSync(work, { recursive: true, force: true });
  try {
    log(`debootstrap ${spec.suite} (${spec.arch}) from ${spec.mirror} ...`);
    const t0 = Date.now();
    await run(["debootstrap", "--variant=minbase", `--arch=${spec.arch}`, `--include=${spec.packages.join(",")}`, spec.suite, work, spec.mirror], {
      timeoutMs: 30 * 60_000,
    });
    const debootstrapMs = Date.now() - t0;
    await customise(work, spec);
    const t1 = Date.now();
    const partial = `${tarball}.${process.pid}.part`;
    await run(["bash", "-c", 'set -o pipefail; tar --numeric-owner --xattrs -C "$1" -cf - . | zstd -T0 -q -3 -o "$2"', "bash", work, partial]);
    renameSync(partial, tarball);
    pruneOtherTarballs(spec, tarball);
    const packMs = Date.now() - t1;
    log(`rootfs cached at ${tarball} (debootstrap ${(debootstrapMs / 1000).toFixed(1)} s, pack ${(packMs / 1000).toFixed(1)} s)`);
    return { tarball, cached: false, debootstrapMs, packMs };
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** Older recipes of the same suite and arch are never used again. */
function pruneOtherTarballs(spec: RootfsSpec, keep: string): void {
  const dir = join(cacheDir(), "rootfs");
  for (const f of readdirSync(dir)) {
    const path = join(dir, f);
    if (path !== keep && f.startsWith(`${spec.suite}-${spec.arch}-`) && f.endsWith(".tar.zst")) rmSync(path, { force: true });
  }
}

/** What makes a debootstrap tree look like a fresh cloud VM. */
async function customise(root: string, spec: RootfsSpec): Promise<void> {
  await run(["chroot", root, "useradd", "--create-home", "--shell", "/bin/bash", "--user-group", spec.user]);
  const sudoers = join(root, "etc", "sudoers.d", `90-${spec.user}`);
  writeFileSync(sudoers, `${spec.user} ALL=(ALL) NOPASSWD:ALL\n`);
  chmodSync(sudoers, 0o440);
  writeFileSync(join(root, "etc", "apt", "sources.list"), spec.sourcesList);
  // Cloud images boot with an empty machine-id; systemd makes one on first boot.
  writeFileSync(join(root, "etc", "machine-id"), "");
  // Like a cloud image: no downloaded .debs and no package lists, so every
  // host's first apt step really runs `apt-get update` (and the result does
  // not depend on how old the cached tarball is).
  for (const dir of [
    ["var", "cache", "apt", "archives"],
    ["var", "lib", "apt", "lists"],
  ]) {
    rmSync(join(root, ...dir), { recursive: true, force: true });
    mkdirSync(join(root, ...dir, "partial"), { recursive: true });
  }
  for (const f of ["pkgcache.bin", "srcpkgcache.bin"]) rmSync(join(root, "var", "cache", "apt", f), { force: true });
}

/** Unpack the tarball into `dest` (which must not exist yet). */
export async function unpackRootfs(tarball: string, dest: string): Promise<void> {
  mkdirSync(dest, { recursive: true, mode: 0o755 });
  await run(["bash", "-c", 'set -o pipefail; zstd -dcq "$1" | tar --numeric-owner --xattrs -xpf - -C "$2"', "bash", tarball, dest]);
}
