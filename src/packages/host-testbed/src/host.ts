/**
 * A throwaway host: a Debian rootfs booted with `systemd-nspawn -b`, sharing
 * this machine's network namespace (so it reaches a hub on 127.0.0.1), with
 * the loop devices bound in for btrfs. Commands go in with `nsenter` into
 * the container's PID 1: on machines whose own PID 1 is not systemd,
 * `machinectl` and `systemd-run -M` do not work.
 *
 * A host's state (its directory, the nspawn PID) is kept in a JSON file in
 * its directory, so the CLI can `exec` into it and take it `down` from
 * another process.
 */
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, chownSync, closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import {
  busyBoundLoops,
  detachLoopsUnder,
  ensureForeignArch,
  ensureLoopDeviceNodes,
  ensureMachinePackages,
  LOOP_DEVICES,
  nativeDebianArch,
  whyNotSupported,
} from "./machine.js";
import { hostsDir } from "./paths.js";
import { type RunOptions, type RunResult, run, sleep } from "./proc.js";
import { defaultRootfsSpec, ensureRootfsTarball, type RootfsSpec, unpackRootfs } from "./rootfs.js";

/**
 * Device nodes a rootless container run needs, in each host's own /dev
 * (nspawn's device policy allows both) with the modes a normal boot gives
 * them: slirp4netns opens /dev/net/tun as the user, fuse-overlayfs /dev/fuse.
 * Binding this machine's nodes would not do: they may be 0600 here.
 */
export const ROOTLESS_DEVICES = [
  { path: "/dev/net/tun", major: 10, minor: 200 },
  { path: "/dev/fuse", major: 10, minor: 229 },
] as const;

const CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

export interface HostUpOptions {
  /** Host name: machine name and hostname (RFC 1123 label). Random when absent. */
  name?: string;
  rootfs?: Partial<RootfsSpec>;
  log?: (line: string) => void;
  bootTimeoutMs?: number;
  /**
   * Called with the (empty) rootfs directory before the rootfs is unpacked,
   * e.g. to mount a file system there (the fault suite's power-cut disk).
   * Whatever it mounts under the host's directory, `down` unmounts.
   */
  prepareRootfs?: (rootfs: string) => Promise<void>;
}

export interface HostTimings {
  rootfsBuildMs: number;
  unpackMs: number;
  bootMs: number;
}

interface HostState {
  name: string;
  dir: string;
  rootfs: string;
  user: string;
  nspawnPid: number | null;
  /** Debian arch of the rootfs (absent in older state files: this machine's). */
  arch?: string;
}

/** Booting takes several times longer when every binary runs under qemu. */
const BOOT_TIMEOUT_MS = 60_000;
const EMULATED_BOOT_TIMEOUT_MS = 300_000;
const POWEROFF_MS = 30_000;
const EMULATED_POWEROFF_MS = 120_000;

export interface ExecOptions extends Omit<RunOptions, "env"> {
  /** Run as this user (via runuser) instead of root. */
  user?: string;
  /** Extra environment; the base is minimal and explicit, like a login's. */
  env?: Record<string, string>;
}

/**
 * `env -i K=V ... [runuser -u USER --] cmd`: a command with a minimal, explicit
 * environment, as root or as `user`.
 */
export function minimalEnvArgv(cmd: readonly string[], opts: { user: string; home: string; path: string; env?: Record<string, string> | undefined }): string[] {
  const { user, home, path } = opts;
  const env = { PATH: path, LANG: "C.UTF-8", HOME: home, USER: user, LOGNAME: user, TERM: "dumb", ...opts.env };
  const asUser = user !== "root" ? ["runuser", "-u", user, "--"] : [];
  return ["env", "-i", ...Object.entries(env).map(([k, v]) => `${k}=${v}`), ...asUser, ...cmd];
}

/** exec and sh on top of execArgv: shared by throwaway hosts and this machine (bootstrap-local). */
export abstract class CommandHost {
  /** argv that runs `cmd` on the host (as root, or as opts.user). */
  abstract execArgv(cmd: readonly string[], opts?: Pick<ExecOptions, "user" | "env">): string[];

  exec(cmd: readonly string[], opts: ExecOptions = {}): Promise<RunResult> {
    const { user, env, ...runOpts } = opts;
    return run(this.execArgv(cmd, { user, env }), runOpts);
  }

  /** Shell one-liner on the host; returns stdout (throws on failure). */
  async sh(script: string, opts: ExecOptions = {}): Promise<string> {
    return (await this.exec(["bash", "-c", script], opts)).stdout;
  }
}

export class ThrowawayHost extends CommandHost {
  private constructor(
    private state: HostState,
    private readonly log: (line: string) => void,
    readonly timings: HostTimings,
  ) {
    super();
  }

  get name(): string {
    return this.state.name;
  }
  /** The host's root filesystem as seen from this machine. */
  get rootfs(): string {
    return this.state.rootfs;
  }
  get dir(): string {
    return this.state.dir;
  }
  get user(): string {
    return this.state.user;
  }
  get arch(): string {
    return this.state.arch ?? nativeDebianArch();
  }
  /** Its binaries run under qemu-user (a foreign arch). */
  get emulated(): boolean {
    return this.arch !== nativeDebianArch();
  }

  /** Build (or reuse) the rootfs tarball, unpack it, boot it, wait for systemd. */
  static async up(opts: HostUpOptions = {}): Promise<ThrowawayHost> {
    const why = whyNotSupported();
    if (why) throw new Error(why);
    const log = opts.log ?? (() => {});
    await ensureMachinePackages(log);
    await ensureLoopDeviceNodes();
    const spec = defaultRootfsSpec(opts.rootfs);
    await ensureForeignArch(spec.arch, log);
    const built = await ensureRootfsTarball(spec, log);
    const name = opts.name ?? `testhost-${randomBytes(3).toString("hex")}`;
    if (!/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/.test(name)) throw new Error(`bad host name ${JSON.stringify(name)}`);
    const dir = join(hostsDir(), name);
    if (existsSync(dir)) throw new Error(`host ${name} already exists at ${dir}; take it down first (host-testbed down ${name})`);
    const rootfs = join(dir, "rootfs");
    const t0 = Date.now();
    if (opts.prepareRootfs) {
      mkdirSync(rootfs, { recursive: true, mode: 0o755 });
      await opts.prepareRootfs(rootfs);
    }
    await unpackRootfs(built.tarball, rootfs);
    const unpackMs = Date.now() - t0;
    writeIdentity(rootfs, name);
    const host = new ThrowawayHost({ name, dir, rootfs, user: spec.user, nspawnPid: null, arch: spec.arch }, log, {
      rootfsBuildMs: built.debootstrapMs + built.packMs,
      unpackMs,
      bootMs: 0,
    });
    host.saveState();
    try {
      await host.boot(opts.bootTimeoutMs);
    } catch (e) {
      await host.down().catch(() => {});
      throw e;
    }
    return host;
  }

  /** Attach to a host started by another process (the CLI). */
  static attach(name: string, log: (line: string) => void = () => {}): ThrowawayHost {
    const file = join(hostsDir(), name, "state.json");
    if (!existsSync(file)) throw new Error(`no host named ${name} (no ${file})`);
    const state = JSON.parse(readFileSync(file, "utf8")) as HostState;
    return new ThrowawayHost(state, log, { rootfsBuildMs: 0, unpackMs: 0, bootMs: 0 });
  }

  /** Names of every host with a directory under hostsDir(). */
  static list(): string[] {
    try {
      return readdirSync(hostsDir()).filter((n) => existsSync(join(hostsDir(), n, "state.json")));
    } catch {
      return [];
    }
  }

  isRunning(): boolean {
    return this.state.nspawnPid !== null && nspawnAlive(this.state.nspawnPid, this.state.name);
  }

  /** PID (in this machine's namespace) of the container's systemd. */
  pid1(): number {
    const nspawn = this.state.nspawnPid;
    if (nspawn === null || !nspawnAlive(nspawn, this.state.name)) throw new Error(`host ${this.name} is not running`);
    const pid = containerInit(nspawn);
    if (pid === null) throw new Error(`host ${this.name}: no container PID 1 under systemd-nspawn (pid ${nspawn})`);
    return pid;
  }

  /** argv that runs `cmd` inside the host (as root, or as opts.user). */
  execArgv(cmd: readonly string[], opts: Pick<ExecOptions, "user" | "env"> = {}): string[] {
    const user = opts.user ?? "root";
    const home = user === "root" ? "/root" : `/home/${user}`;
    return ["nsenter", "-t", String(this.pid1()), "-a", ...minimalEnvArgv(cmd, { user, home, path: CONTAINER_PATH, env: opts.env })];
  }

  /**
   * `btrfs ARGS... <mountpoint>` for the btrfs mounted at `mountpoint` in the
   * host. Emulated, qemu-user lacks btrfs's search ioctls ("Function not
   * implemented"), so the same filesystem (its loop device) is mounted on
   * this machine for the moment and this machine's btrfs reads it.
   */
  async btrfs(args: readonly string[], mountpoint: string, opts: ExecOptions = {}): Promise<RunResult> {
    if (!this.emulated) return this.exec(["btrfs", ...args, mountpoint], opts);
    const source = (await this.sh(`findmnt -n -o SOURCE ${mountpoint}`)).trim();
    if (!/^\/dev\/loop\d+$/.test(source)) throw new Error(`host ${this.name}: ${mountpoint} is on ${JSON.stringify(source)}, not a loop device`);
    const dir = mkdtempSync(join(this.dir, "btrfs-"));
    try {
      await run(["mount", "-t", "btrfs", source, dir]);
      try {
        return await run(["btrfs", ...args, dir], { allowFailure: opts.allowFailure, timeoutMs: opts.timeoutMs });
      } finally {
        await run(["umount", dir], { allowFailure: true });
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  /** Host path of a path inside the container. */
  path(inside: string): string {
    return join(this.rootfs, inside);
  }

  /** Write a file into the host, with owner (a user name in the host) and mode. */
  writeFile(inside: string, content: string | Buffer, opts: { mode?: number; owner?: string } = {}): void {
    const file = this.path(inside);
    mkdirSync(dirname(file), { recursive: true });
    writeFileSync(file, content, { mode: opts.mode ?? 0o644 });
    chmodSync(file, opts.mode ?? 0o644);
    if (opts.owner) {
      const { uid, gid } = this.lookupUser(opts.owner);
      chownSync(file, uid, gid);
    }
  }

  readFile(inside: string): string {
    return readFileSync(this.path(inside), "utf8");
  }

  /** uid/gid of a user of the host, from its /etc/passwd (no user namespace: ids are the same here). */
  lookupUser(name: string): { uid: number; gid: number; home: string } {
    for (const line of this.readFile("/etc/passwd").split("\n")) {
      const f = line.split(":");
      if (f[0] === name) return { uid: Number(f[2]), gid: Number(f[3]), home: f[5] ?? "" };
    }
    throw new Error(`host ${this.name}: no user ${name}`);
  }

  /** Power the host off and boot it again on the same rootfs. */
  async reboot(bootTimeoutMs?: number): Promise<void> {
    await this.stop();
    await this.boot(bootTimeoutMs);
  }

  /**
   * Stop the container and release its loop devices, but keep its files:
   * the benchmark parks a host after its runs and deletes it later, so no
   * mass deletion lands right before another host's timed run.
   */
  async park(): Promise<void> {
    await this.stop();
    for (const d of await detachLoopsUnder(this.rootfs)) this.log(`${this.name}: detached ${d}`);
  }

  /** Stop the container, release its loop devices and mounts, delete it. */
  async down(): Promise<void> {
    await this.stop();
    const detached = await detachLoopsUnder(this.rootfs);
    for (const d of detached) this.log(`${this.name}: detached ${d}`);
    await unmountUnder(this.dir);
    rmSync(this.dir, { recursive: true, force: true });
    this.log(`${this.name}: removed ${this.dir}`);
  }

  private async boot(timeoutMs = this.emulated ? EMULATED_BOOT_TIMEOUT_MS : BOOT_TIMEOUT_MS): Promise<void> {
    const t0 = Date.now();
    for (const d of busyBoundLoops()) {
      this.log(`note: ${d.path} is in use (${d.backingFile}); the host gets the free ones`);
    }
    if (busyBoundLoops().length >= LOOP_DEVICES) throw new Error(`all of /dev/loop0..${LOOP_DEVICES - 1} are in use; free one (losetup -d) first`);
    const consolePath = join(this.dir, "console.log");
    const consoleFd = openSync(consolePath, "a");
    const loops = Array.from({ length: LOOP_DEVICES }, (_, i) => `--bind=/dev/loop${i}`);
    const argv = [
      "-b",
      "--register=no",
      "--keep-unit",
      "--console=read-only",
      `--directory=${this.rootfs}`,
      `--machine=${this.name}`,
      `--hostname=${this.name}`,
      "--capability=all",
      // The host shares this machine's clock: chrony inside must not set it
      // (chrony.service has ConditionCapability=CAP_SYS_TIME, so it stays inactive).
      "--drop-capability=CAP_SYS_TIME",
      "--resolv-conf=copy-host",
      "--timezone=off",
      "--bind=/dev/loop-control",
      ...loops,
    ];
    const child = spawn("systemd-nspawn", argv, {
      detached: true,
      stdio: ["ignore", consoleFd, consoleFd],
      // /proc/sys/net writable: crun sets net.ipv4.ping_group_range in each rootless container's own
      // network namespace, and a user namespace cannot mount a fresh /proc over nspawn's read-only one.
      env: { ...process.env, SYSTEMD_NSPAWN_API_VFS_WRITABLE: "network" },
    });
    closeSync(consoleFd);
    child.unref();
    if (!child.pid) throw new Error("systemd-nspawn did not start");
    this.state.nspawnPid = child.pid;
    this.saveState();
    await this.waitForSystemd(timeoutMs, consolePath);
    // nspawn copies /dev/net/tun into the host's own /dev (a tmpfs) with this machine's mode, which may be 0600
    const mknod = ROOTLESS_DEVICES.map(
      (d) =>
        `if [ -e ${d.path} ]; then mountpoint -q ${d.path} || chmod 666 ${d.path}; else mkdir -p ${dirname(d.path)} && mknod -m 666 ${d.path} c ${d.major} ${d.minor}; fi`,
    );
    await this.exec(["sh", "-c", mknod.join("; ")], { timeoutMs: 10_000 });
    this.timings.bootMs = Date.now() - t0;
    this.log(`${this.name}: up in ${((Date.now() - t0) / 1000).toFixed(1)} s (rootfs ${this.rootfs})`);
  }

  private async waitForSystemd(timeoutMs: number, consolePath: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let last = "";
    while (Date.now() < deadline) {
      if (!this.isRunning()) {
        throw new Error(`host ${this.name}: systemd-nspawn exited during boot; console:\n${tail(consolePath)}`);
      }
      if (containerInit(this.state.nspawnPid!) !== null) {
        const r = await this.exec(["systemctl", "is-system-running"], { allowFailure: true, timeoutMs: 10_000 });
        last = r.stdout.trim();
        if (last === "running" || last === "degraded") return;
      }
      await sleep(200);
    }
    throw new Error(`host ${this.name}: systemd not running after ${timeoutMs} ms (state ${last || "unknown"}); console:\n${tail(consolePath)}`);
  }

  /** Orderly poweroff, then the hard way. Keeps the rootfs. */
  private async stop(): Promise<void> {
    const nspawn = this.state.nspawnPid;
    if (nspawn === null || !nspawnAlive(nspawn, this.state.name)) {
      this.state.nspawnPid = null;
      this.saveState();
      return;
    }
    const init = containerInit(nspawn);
    if (init !== null && this.emulated) {
      // qemu-user renumbers the real-time signals, so ask systemd itself.
      await this.exec(["systemctl", "poweroff", "--no-block"], { allowFailure: true, timeoutMs: 60_000 });
    } else if (init !== null) {
      // SIGRTMIN+3 asks systemd for an orderly poweroff; nspawn exits when it is done.
      await run(["kill", "-s", "RTMIN+3", String(init)], { allowFailure: true });
    }
    const poweroffMs = this.emulated ? EMULATED_POWEROFF_MS : POWEROFF_MS;
    if (!(await waitGone(nspawn, this.state.name, poweroffMs))) {
      this.log(`${this.name}: no clean poweroff in ${poweroffMs / 1000} s; killing`);
      if (init !== null) signal(init, "SIGKILL"); // the container's PID 1: takes its whole PID namespace
      signal(nspawn, "SIGKILL");
      await waitGone(nspawn, this.state.name, 10_000);
    }
    this.state.nspawnPid = null;
    this.saveState();
  }

  private saveState(): void {
    mkdirSync(this.state.dir, { recursive: true });
    writeFileSync(join(this.state.dir, "state.json"), `${JSON.stringify(this.state, null, 2)}\n`);
  }
}

function writeIdentity(rootfs: string, name: string): void {
  // Without these sudo warns "unable to resolve host" on every call.
  writeFileSync(join(rootfs, "etc", "hostname"), `${name}\n`);
  writeFileSync(join(rootfs, "etc", "hosts"), `127.0.0.1\tlocalhost\n127.0.1.1\t${name}\n::1\tlocalhost ip6-localhost ip6-loopback\n`);
}

function readProc(pid: number, file: string): string | null {
  try {
    return readFileSync(`/proc/${pid}/${file}`, "utf8");
  } catch {
    return null;
  }
}

/** Alive, not a zombie, and really our nspawn (PIDs get reused). */
function nspawnAlive(pid: number, name: string): boolean {
  const stat = readProc(pid, "stat");
  if (!stat || / Z /.test(stat.slice(stat.lastIndexOf(")")))) return false;
  const cmdline = (readProc(pid, "cmdline") ?? "").split("\0");
  return cmdline.some((a) => a.endsWith("systemd-nspawn")) && cmdline.includes(`--machine=${name}`);
}

/** The container's init: a child of nspawn whose PID in its own namespace is 1. */
function containerInit(nspawnPid: number): number | null {
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const status = readProc(Number(entry), "status");
    if (!status) continue;
    const ppid = /^PPid:\s+(\d+)/m.exec(status)?.[1];
    const nspid = /^NSpid:\s+(.*)$/m.exec(status)?.[1]?.trim().split(/\s+/);
    if (Number(ppid) === nspawnPid && nspid && nspid.length > 1 && nspid[nspid.length - 1] === "1") return Number(entry);
  }
  return null;
}

async function waitGone(pid: number, name: string, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (!nspawnAlive(pid, name)) return true;
    await sleep(100);
  }
  return !nspawnAlive(pid, name);
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // gone
  }
}

/** Unmount everything mounted at or below `dir` on this machine, deepest first. */
async function unmountUnder(dir: string): Promise<void> {
  const mounts = readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .map((l) => l.split(" ")[4])
    .filter((m): m is string => !!m && (m === dir || m.startsWith(`${dir}/`)))
    .map((m) => m.replace(/\\040/g, " "))
    .sort((a, b) => b.length - a.length);
  for (const m of mounts) {
    const r = await run(["umount", m], { allowFailure: true });
    if (r.code !== 0) await run(["umount", "-l", m], { allowFailure: true });
  }
}

function tail(file: string, lines = 30): string {
  try {
    return readFileSync(file, "utf8").split("\n").slice(-lines).join("\n");
  } catch {
    return "(no console log)";
  }
}
