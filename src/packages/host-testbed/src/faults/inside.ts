/**
 * Faults made inside a throwaway host: the dpkg/apt locks held by another
 * process (fcntl write locks on the whole file, as apt and dpkg take them),
 * and a full file system where the bootstrap writes.
 */
import { chownSync, mkdirSync, rmSync, statfsSync } from "node:fs";
import { join } from "node:path";
import type { ThrowawayHost } from "../host.js";
import { run, sleep } from "../proc.js";
import { containerProcesses } from "./kill.js";

/** The holder's file inside the host: its name is what the bootstrap's message names. */
export const LOCK_HOLDER = "/root/fault-lock-holder.py";

const HOLDER_SOURCE = `import fcntl, os, sys, time
# fault-lock-holder: hold fcntl write locks on the given files, like apt/dpkg do, for N seconds
seconds = float(sys.argv[1])
fds = []
for path in sys.argv[2:]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fds.append(fd)
print("holding", *sys.argv[2:], flush=True)
time.sleep(seconds)
`;

export const DPKG_LOCKS = ["/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock"];
export const APT_LISTS_LOCK = "/var/lib/apt/lists/lock";

export interface HeldLock {
  /** The holder's PID in this machine's namespace. */
  pid: number;
  /** Resolves when the holder exits (released or killed). */
  done: Promise<unknown>;
  release(): Promise<void>;
}

/** Hold `paths` (fcntl write locks) from a process inside the host for `seconds`. */
export async function holdLocks(host: ThrowawayHost, paths: string[], seconds: number): Promise<HeldLock> {
  host.writeFile(LOCK_HOLDER, HOLDER_SOURCE, { mode: 0o700, owner: "root" });
  const done = host.exec(["python3", LOCK_HOLDER, String(seconds), ...paths], { allowFailure: true, timeoutMs: (seconds + 60) * 1000 });
  const deadline = Date.now() + 15_000;
  for (;;) {
    const holder = containerProcesses(host.pid1()).find((p) => p.cmdline.includes(LOCK_HOLDER));
    if (holder && (await locksHeldBy(host, holder.pid, paths))) {
      return {
        pid: holder.pid,
        done,
        async release() {
          try {
            process.kill(holder.pid, "SIGKILL");
          } catch {
            // gone
          }
          await done;
        },
      };
    }
    if (Date.now() > deadline) throw new Error(`the lock holder did not take ${paths.join(", ")} within 15 s`);
    await sleep(100);
  }
}

async function locksHeldBy(host: ThrowawayHost, _pid: number, paths: string[]): Promise<boolean> {
  // /proc/locks inside the host lists the holder with its PID there; ask the host for the inode of each path
  const locks = await host.sh("cat /proc/locks");
  for (const p of paths) {
    const ino = (await host.sh(`stat -c %i ${p}`)).trim();
    if (!locks.split("\n").some((l) => /POSIX\s+ADVISORY\s+WRITE/.test(l) && l.split(/\s+/)[5]?.endsWith(`:${ino}`))) return false;
  }
  return true;
}

export interface FullFs {
  /** The mount point inside the host. */
  mountPoint: string;
  sizeBytes: number;
  /** Free bytes left after filling. */
  freeBytes: number;
  /** Make room again: remove the filler. */
  free(): Promise<void>;
}

/**
 * A small file system of its own (a tmpfs of `sizeBytes`) at `dir` inside
 * the host, filled with one file until only `leaveBytes` are free: the
 * bootstrap gets a real ENOSPC there and nowhere else. It is mounted from
 * this machine at the host's path and the host is rebooted to see it (a
 * mount made inside the host would be invisible to the checks that read
 * the host's files from here); `down` unmounts it with the host.
 */
export async function fullFs(host: ThrowawayHost, dir: string, opts: { sizeBytes: number; leaveBytes: number; owner: string }): Promise<FullFs> {
  const { uid, gid } = host.lookupUser(opts.owner);
  const at = host.path(dir);
  mkdirSync(at, { recursive: true });
  chownSync(at, uid, gid);
  await run(["mount", "-t", "tmpfs", "-o", `size=${opts.sizeBytes},mode=0755,uid=${uid},gid=${gid}`, "fault-full-fs", at]);
  const filler = join(at, ".fault-filler");
  const avail = () => statfsSync(at).bavail * statfsSync(at).bsize;
  await run(["fallocate", "-l", String(Math.max(0, avail() - opts.leaveBytes)), filler]);
  await host.reboot();
  const seen = (await host.sh(`findmnt -n -o FSTYPE ${dir}`)).trim();
  if (seen !== "tmpfs") throw new Error(`the host does not see the full file system at ${dir} (found ${seen || "nothing"})`);
  return {
    mountPoint: dir,
    sizeBytes: opts.sizeBytes,
    freeBytes: avail(),
    async free() {
      rmSync(filler, { force: true });
    },
  };
}
