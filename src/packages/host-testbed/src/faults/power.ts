/**
 * A hard power-off of a throwaway host, with the data loss a real one has.
 *
 * Killing systemd-nspawn alone is not a power cut: the host's files live in
 * this machine's page cache, so every write the host made, synced or not,
 * survives. Here the host's rootfs is an ext4 file system of its own (a
 * sparse image on a loop device, mounted at the rootfs directory, journal
 * commit every `commitS` seconds), and a power cut is:
 *
 *   1. every process of the host is stopped (SIGSTOP: nothing runs after the
 *      cut, not even a sender that would tell the hub about errors);
 *   2. the file system is shut down without flushing anything
 *      (EXT4_IOC_SHUTDOWN with EXT4_GOING_FLAGS_NOLOGFLUSH, what fstests'
 *      `godown` does): writes that were not synced (fsync, sync, or the
 *      journal's own commit) are lost, exactly like a disk losing power;
 *   3. the host's processes and nspawn are SIGKILLed, loop devices backed by
 *      files inside it (the btrfs image) detached, the rootfs unmounted;
 *   4. power-on: mount again (the journal is replayed: the state of the last
 *      commit or sync) and boot.
 *
 * What it does not simulate: a disk that reorders or tears writes inside a
 * sync, or a btrfs image's own unflushed state beyond what its loop device
 * had written into the ext4 file (that is lost with the rest).
 */
import { existsSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import type { ThrowawayHost } from "../host.js";
import { LOOP_DEVICES } from "../machine.js";
import { run, sleep } from "../proc.js";
import { containerProcesses } from "./kill.js";

export interface PowerCutDiskOptions {
  sizeGb?: number;
  /** ext4 journal commit interval: how much unsynced work a cut can lose (default 30 s). */
  commitS?: number;
}

export class PowerCutDisk {
  private rootfs: string | null = null;
  readonly cuts: { at: number; stopped: number }[] = [];

  constructor(private readonly opts: PowerCutDiskOptions = {}) {}

  get image(): string {
    if (!this.rootfs) throw new Error("PowerCutDisk: not prepared (pass disk.prepare as prepareRootfs to ThrowawayHost.up)");
    return join(dirname(this.rootfs), "rootfs-disk.img");
  }

  /** For `ThrowawayHost.up({ prepareRootfs })`: make and mount the file system at the rootfs directory. */
  readonly prepare = async (rootfs: string): Promise<void> => {
    this.rootfs = rootfs;
    mkdirSync(dirname(rootfs), { recursive: true });
    await run(["truncate", "-s", `${this.opts.sizeGb ?? 6}G`, this.image]);
    await run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", this.image]);
    await this.mount();
  };

  /**
   * Attach the image to a loop device above the LOOP_DEVICES every host gets
   * bound in (/dev/loop0..LOOP_DEVICES-1, machine.ts), so the host's own disk
   * never takes one that a host (this one or another) mounts its btrfs image on.
   */
  private async attach(): Promise<string> {
    for (let n = LOOP_DEVICES; n < 64; n++) {
      const dev = `/dev/loop${n}`;
      if (existsSync(`/sys/block/loop${n}/loop/backing_file`)) continue;
      if (!existsSync(dev)) await run(["mknod", "-m", "0660", dev, "b", "7", String(n)], { allowFailure: true });
      const r = await run(["losetup", dev, this.image], { allowFailure: true });
      if (r.code === 0) return dev;
    }
    throw new Error(`power-cut disk: no free loop device among /dev/loop${LOOP_DEVICES}..63`);
  }

  private async mount(): Promise<void> {
    const dev = await this.attach();
    const r = await run(["mount", "-o", `commit=${this.opts.commitS ?? 30}`, dev, this.rootfs!], { allowFailure: true });
    if (r.code !== 0) {
      await run(["losetup", "-d", dev], { allowFailure: true });
      throw new Error(`power-cut disk: mount ${dev} on ${this.rootfs}: ${r.stderr.trim()}`);
    }
  }

  /** After the host is down (its rootfs unmounted): free the image's loop device. */
  async detach(): Promise<void> {
    if (!this.rootfs) return;
    const mine = await this.loopDevice();
    if (mine) await run(["losetup", "-d", mine.name], { allowFailure: true });
  }

  /** Cut the power: stop everything, lose unsynced writes, kill, unmount. */
  async cut(host: ThrowawayHost): Promise<void> {
    const rootfs = this.rootfs;
    if (!rootfs) throw new Error("PowerCutDisk: not prepared");
    const init = host.pid1();
    const nspawn = Number(/^PPid:\s+(\d+)/m.exec(readFileSync(`/proc/${init}/status`, "utf8"))?.[1]);
    // 1. freeze the host (until no new process appears)
    const stopped = new Set<number>();
    const parents = new Set<number>();
    for (let pass = 0; pass < 20; pass++) {
      const fresh = containerProcesses(init).filter((p) => !stopped.has(p.pid));
      if (fresh.length === 0) break;
      for (const p of fresh) {
        signalQuietly(p.pid, "SIGSTOP");
        stopped.add(p.pid);
        parents.add(p.ppid);
      }
    }
    // 2. the disk loses power: nothing more reaches it, unsynced data is gone
    await run([
      "python3",
      "-c",
      "import fcntl, os, struct, sys\n" +
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n" +
        "fcntl.ioctl(fd, 0x8004587D, struct.pack('I', 2))  # EXT4_IOC_SHUTDOWN, EXT4_GOING_FLAGS_NOLOGFLUSH\n",
      rootfs,
    ]);
    // 3. the processes die; nspawn follows its init. nsenter (outside the host) stopped itself
    // with its child: wake it, so it sees the child die and exits.
    for (const pid of stopped) signalQuietly(pid, "SIGKILL");
    signalQuietly(init, "SIGKILL");
    if (nspawn) signalQuietly(nspawn, "SIGKILL");
    for (const p of parents) if (!stopped.has(p)) signalQuietly(p, "SIGCONT");
    const deadline = Date.now() + 20_000;
    while (Date.now() < deadline && (existsSync(`/proc/${init}`) || (nspawn && isLive(nspawn)))) await sleep(50);
    // loop devices the host attached to files on its disk (the btrfs image) keep the dead file
    // system busy: detach them (found by their backing device: stat() of a shut-down fs fails)
    const disk = await this.loopDevice();
    for (let i = 0; i < 50; i++) {
      const users = disk ? await loopsBackedBy(disk.majMin) : [];
      if (users.length === 0) break;
      for (const u of users) await run(["losetup", "-d", u], { allowFailure: true });
      await sleep(100);
    }
    // mounts nspawn made under the rootfs are gone with its mount namespace; ours is the rootfs itself
    let r = await run(["umount", rootfs], { allowFailure: true });
    for (let i = 0; r.code !== 0 && i < 50; i++) {
      await sleep(100);
      r = await run(["umount", rootfs], { allowFailure: true });
    }
    if (r.code !== 0) throw new Error(`power cut: cannot unmount ${rootfs}: ${r.stderr.trim()}`);
    // the image's own loop device: detached, so the next mount starts from what the disk holds
    for (let i = 0; i < 100 && (await this.loopDevice()); i++) {
      if (disk) await run(["losetup", "-d", disk.name], { allowFailure: true });
      await sleep(100);
    }
    this.cuts.push({ at: Date.now(), stopped: stopped.size });
  }

  /** The loop device our image is attached to, if any. */
  private async loopDevice(): Promise<{ name: string; majMin: string } | null> {
    const r = await run(["losetup", "--json", "--list", "-O", "NAME,MAJ:MIN,BACK-FILE"], { allowFailure: true });
    if (r.code !== 0 || !r.stdout.trim()) return null;
    const devs = (JSON.parse(r.stdout) as { loopdevices?: Record<string, string>[] }).loopdevices ?? [];
    const mine = devs.find((d) => String(d["back-file"] ?? "").replace(/ \(deleted\)$/, "") === this.image);
    return mine ? { name: String(mine.name), majMin: String(mine["maj:min"]).trim() } : null;
  }

  /** Power on: mount (journal replay) and boot the host. */
  async powerOn(host: ThrowawayHost, bootTimeoutMs?: number): Promise<void> {
    await this.mount();
    await host.reboot(bootTimeoutMs);
  }
}

/** Loop devices whose backing file lives on block device `majMin` (e.g. "7:0"). */
async function loopsBackedBy(majMin: string): Promise<string[]> {
  const r = await run(["losetup", "--json", "--list", "-O", "NAME,BACK-MAJ:MIN"], { allowFailure: true });
  if (r.code !== 0 || !r.stdout.trim()) return [];
  const devs = (JSON.parse(r.stdout) as { loopdevices?: Record<string, string>[] }).loopdevices ?? [];
  return devs.filter((d) => String(d["back-maj:min"]).trim() === majMin).map((d) => String(d.name));
}

function signalQuietly(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // gone
  }
}

function isLive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return !/ Z /.test(stat.slice(stat.lastIndexOf(")")));
  } catch {
    return false;
  }
}
