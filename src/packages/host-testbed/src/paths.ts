/** Where the testbed keeps its caches and its running hosts. */
import { join } from "node:path";

/** Long-lived cache: debootstrap tarballs, npm packs, built artifacts. */
export function cacheDir(): string {
  if (process.env.HOST_TESTBED_CACHE) return process.env.HOST_TESTBED_CACHE;
  if (process.env.XDG_CACHE_HOME) return join(process.env.XDG_CACHE_HOME, "cocalc-host-testbed");
  return "/var/cache/cocalc-host-testbed";
}

/**
 * Running hosts: one directory per host with its rootfs, console log and
 * state file. On disk (/var/tmp), not tmpfs: a rootfs plus a btrfs image
 * does not belong in RAM.
 */
export function hostsDir(): string {
  return process.env.HOST_TESTBED_HOSTS ?? "/var/tmp/cocalc-host-testbed/hosts";
}
