/**
 * What the bench watches from the outside while a bootstrap runs: bytes the
 * artifact server sends (throughput), bootstrap.py's memory, and how busy
 * the machine is (the noise every figure carries).
 */
import { createHash } from "node:crypto";
import { closeSync, fsyncSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeSync } from "node:fs";
import { loadavg } from "node:os";
import { join } from "node:path";
import type { RequestLogEntry } from "../src/artifact-server.js";
import { type ByteSample, type CpuTicks, type Noise, noise, parseProcStat, procStatTicks } from "./metrics.js";

/** Samples the cumulative bytes of the server's requests made after start(). */
export class ByteSampler {
  readonly samples: ByteSample[] = [];
  private timer: NodeJS.Timeout | null = null;
  private first = 0;

  constructor(
    private readonly requests: RequestLogEntry[],
    private readonly periodMs = 50,
  ) {}

  start(): void {
    this.first = this.requests.length;
    this.sample();
    this.timer = setInterval(() => this.sample(), this.periodMs);
  }

  stop(): ByteSample[] {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.sample();
    return this.samples;
  }

  private sample(): void {
    let bytes = 0;
    for (let i = this.first; i < this.requests.length; i++) bytes += this.requests[i]!.bytes;
    this.samples.push({ t_ms: performance.now(), bytes });
  }
}

/**
 * Peak resident memory of bootstrap.py: the kernel's own high-water mark
 * (VmHWM in /proc/<pid>/status), read every `periodMs` from this machine for
 * every python process running bootstrap.py inside the host (its root
 * directory is the host's rootfs). VmHWM only grows, so sampling misses at
 * most what the process grew in its last period.
 */
export class MemorySampler {
  private timer: NodeJS.Timeout | null = null;
  private readonly peakKb = new Map<number, number>();
  private root: { dev: number; ino: number } | null = null;

  constructor(
    private readonly rootfs: string,
    private readonly periodMs = 200,
  ) {}

  start(): void {
    this.root = statSync(this.rootfs);
    this.timer = setInterval(() => this.sample(), this.periodMs);
  }

  /** Largest VmHWM seen (kB), null when no bootstrap.py was ever seen. */
  stop(): number | null {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    return this.peakKb.size ? Math.max(...this.peakKb.values()) : null;
  }

  private sample(): void {
    if (!this.root) return;
    for (const pid of bootstrapPids(this.root)) {
      const hwm = vmHwmKb(pid);
      if (hwm !== null) this.peakKb.set(pid, Math.max(hwm, this.peakKb.get(pid) ?? 0));
    }
  }
}

function bootstrapPids(rootfs: { dev: number; ino: number }): number[] {
  const out: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    let argv: string[];
    try {
      argv = readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0");
    } catch {
      continue;
    }
    if (!/python/.test(argv[0] ?? "") || !argv.some((a) => a.endsWith("bootstrap.py"))) continue;
    try {
      // readlink shows "/" across mount namespaces; the directory itself tells.
      const root = statSync(`/proc/${entry}/root`);
      if (root.dev !== rootfs.dev || root.ino !== rootfs.ino) continue;
    } catch {
      continue;
    }
    out.push(Number(entry));
  }
  return out;
}

function vmHwmKb(pid: number): number | null {
  try {
    const m = /^VmHWM:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

export interface MachineNoise {
  /** 1-minute load average when the run started (2 cores here: above 2 means waiting). */
  loadavg_1m: number;
  /** ms to sha256 a fixed 32 MB buffer: CPU speed as this run saw it. */
  cpu_probe_ms: number;
  /** ms to write and fsync 64 MB in `dir`: the shared disk as this run saw it. */
  disk_probe_ms: number;
}

const PROBE_BUFFER = Buffer.alloc(32 * 1024 * 1024, 7);

/** A quick look at how loaded the machine is, taken before each run. */
export function probeMachine(dir: string): MachineNoise {
  const t0 = performance.now();
  createHash("sha256").update(PROBE_BUFFER).digest();
  const cpu = performance.now() - t0;
  const file = join(dir, `.bench-disk-probe-${process.pid}`);
  const t1 = performance.now();
  const fd = openSync(file, "w");
  try {
    for (let i = 0; i < 2; i++) writeSync(fd, PROBE_BUFFER);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
    rmSync(file, { force: true });
  }
  const disk = performance.now() - t1;
  return { loadavg_1m: loadavg()[0]!, cpu_probe_ms: Math.round(cpu), disk_probe_ms: Math.round(disk) };
}

// --- CPU accounting: the machine, the host under test, this process ------------------------

/** The machine's CPU ticks so far (/proc/stat). */
export function machineTicks(): CpuTicks {
  return parseProcStat(readFileSync("/proc/stat", "utf8"));
}

/**
 * CPU ticks of every process whose root directory is `rootfs` (the host's
 * processes: its systemd tree and the daemon), each counting its own time
 * and the time of the children it reaped.
 */
export function hostTreeTicks(rootfs: string): number {
  const root = statSync(rootfs);
  let ticks = 0;
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const r = statSync(`/proc/${entry}/root`);
      if (r.dev !== root.dev || r.ino !== root.ino) continue;
      ticks += procStatTicks(readFileSync(`/proc/${entry}/stat`, "utf8"));
    } catch {
      // gone, or not ours to read
    }
  }
  return ticks;
}

/** This process's CPU ticks and those of the children it reaped (nsenter and the bootstrap's whole tree under it). */
export function selfTicks(): number {
  return procStatTicks(readFileSync("/proc/self/stat", "utf8"));
}

/** Snapshot before a run; `finish()` after it gives the run's noise figures. */
export class CpuAccount {
  private readonly machine0 = machineTicks();
  private readonly host0: number;
  private readonly self0 = selfTicks();
  private readonly t0 = performance.now();

  constructor(
    private readonly rootfs: string,
    private readonly cores: number,
  ) {
    this.host0 = hostTreeTicks(rootfs);
  }

  finish(): Noise {
    const wall = (performance.now() - this.t0) / 1000;
    const ours = (hostTreeTicks(this.rootfs) - this.host0 + selfTicks() - this.self0) / 100;
    return noise(this.machine0, machineTicks(), ours, wall, this.cores);
  }
}
