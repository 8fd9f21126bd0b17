/**
 * The Debian root filesystem every throwaway host starts from: made once
 * with debootstrap, customised (user, sudo, apt sources), packed as a zstd
 * tarball in the cache and unpacked per host. The cache key covers
 * everything that shapes the tarball, so changing the package list or the
 * recipe builds a new one.
 */
import { createHash } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { debianMirror, sourcesListFor } from "./apt-sources.js";
import { cacheDir } from "./paths.js";
import { run } from "./proc.js";

/** Bump when the customisation below changes, so old tarballs are not reused. */
const RECIPE_VERSION = 1;

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
  return process.arch === "arm64" ? "arm64" : "amd64";
}

export function rootfsKey(spec: RootfsSpec): string {
  return createHash("sha256").update(JSON.stringify({ RECIPE_VERSION, ...spec })).digest("hex").slice(0, 16);
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
  const work = join(cacheDir(), "rootfs", `build-${rootfsKey(spec)}-${process.pid}`);
  rmSync(work, { recursive: true, force: true });
  try {
    log(`debootstrap ${spec.suite} (${spec.arch}) from ${spec.mirror} ...`);
    const t0 = Date.now();
    await run(
      ["debootstrap", "--variant=minbase", `--arch=${spec.arch}`, `--include=${spec.packages.join(",")}`, spec.suite, work, spec.mirror],
      { timeoutMs: 30 * 60_000 },
    );
    const debootstrapMs = Date.now() - t0;
    await customise(work, spec);
    const t1 = Date.now();
    const partial = `${tarball}.${process.pid}.part`;
    await run(["bash", "-c", 'set -o pipefail; tar --numeric-owner --xattrs -C "$1" -cf - . | zstd -T0 -q -3 -o "$2"', "bash", work, partial]);
    renameSync(partial, tarball);
    const packMs = Date.now() - t1;
    log(`rootfs cached at ${tarball} (debootstrap ${(debootstrapMs / 1000).toFixed(1)} s, pack ${(packMs / 1000).toFixed(1)} s)`);
    return { tarball, cached: false, debootstrapMs, packMs };
  } finally {
    rmSync(work, { recursive: true, force: true });
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
  // Debian's apt cleans downloaded .debs; keep images small.
  rmSync(join(root, "var", "cache", "apt", "archives"), { recursive: true, force: true });
  mkdirSync(join(root, "var", "cache", "apt", "archives", "partial"), { recursive: true });
}

/** Unpack the tarball into `dest` (which must not exist yet). */
export async function unpackRootfs(tarball: string, dest: string): Promise<void> {
  mkdirSync(dest, { recursive: true, mode: 0o755 });
  await run(["bash", "-c", 'set -o pipefail; zstd -dcq "$1" | tar --numeric-owner --xattrs -xpf - -C "$2"', "bash", tarball, dest]);
}
