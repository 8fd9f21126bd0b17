/**
 * Killing a running bootstrap the hard way: SIGKILL of its whole process
 * tree inside a throwaway host (the stub's shells, bootstrap.py, and every
 * command under it: sudo, apt-get, dpkg and its maintainer scripts,
 * mkfs.btrfs, systemctl, ...) at a chosen moment. The daemon systemd
 * started is not in the tree and survives, as it would.
 *
 * The moment is a `KillTrigger`, polled every few milliseconds from this
 * machine: a step's start (bootstrap.log's `step_start` record), a point
 * inside a step (a fraction of its duration in a reference run), a process
 * of the tree whose command line matches (dpkg, mkfs.btrfs, systemctl
 * restart), a file inside the host (a `.part` of some size, a staging
 * directory), or a fixed delay.
 */
import { existsSync, readdirSync, readFileSync, readlinkSync, statSync } from "node:fs";
import { sleep } from "../proc.js";

export type KillTrigger =
  | { kind: "step-start"; step: string }
  | { kind: "step-fraction"; step: string; fraction: number; expectedMs: number }
  | { kind: "process"; pattern: RegExp; step?: string }
  | { kind: "file"; describe: string; test: (hostPath: (inside: string) => string) => boolean }
  | { kind: "delay"; ms: number };

export interface KillPoint {
  /** Short name for reports, e.g. `apt:dpkg` or `btrfs:start`. */
  name: string;
  trigger: KillTrigger;
  /** `sigkill` (default) or `power`: a hard power-off of the whole host. */
  how?: "sigkill" | "power";
}

export interface ProcInfo {
  pid: number;
  ppid: number;
  cmdline: string;
}

function readProc(pid: number, file: string): string | null {
  try {
    return readFileSync(`/proc/${pid}/${file}`, "utf8");
  } catch {
    return null;
  }
}

function pidNs(pid: number): string | null {
  try {
    return readlinkSync(`/proc/${pid}/ns/pid`);
  } catch {
    return null;
  }
}

/** Every process in the PID namespace of `init` (the container's PID 1), as seen from this machine. */
export function containerProcesses(init: number): ProcInfo[] {
  const ns = pidNs(init);
  if (!ns) return [];
  const out: ProcInfo[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pidNs(pid) !== ns) continue;
    const status = readProc(pid, "status");
    const ppid = Number(/^PPid:\s+(\d+)/m.exec(status ?? "")?.[1] ?? 0);
    const cmdline = (readProc(pid, "cmdline") ?? "").replace(/\0+$/, "").replace(/\0/g, " ");
    out.push({ pid, ppid, cmdline });
  }
  return out;
}

function childrenOf(pid: number): number[] {
  const out: number[] = [];
  let tasks: string[] = [];
  try {
    tasks = readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const t of tasks) {
    const text = readProc(pid, `task/${t}/children`) ?? "";
    for (const c of text.split(" ")) if (c.trim()) out.push(Number(c));
  }
  return out;
}

function procInfo(pid: number): ProcInfo | null {
  const status = readProc(pid, "status");
  if (!status) return null;
  const ppid = Number(/^PPid:\s+(\d+)/m.exec(status)?.[1] ?? 0);
  const cmdline = (readProc(pid, "cmdline") ?? "").replace(/\0+$/, "").replace(/\0/g, " ");
  return { pid, ppid, cmdline };
}

/**
 * The same tree, fast enough to poll every few milliseconds: the roots are
 * found once by a scan of /proc (cached while they live), the descendants
 * through /proc/<pid>/task/<tid>/children.
 */
export function treeWatcher(init: () => number, stubPath: string): () => ProcInfo[] {
  let roots: number[] = [];
  return () => {
    if (roots.length === 0 || !roots.every((r) => existsSync(`/proc/${r}`))) {
      roots = containerProcesses(init())
        .filter((p) => p.cmdline.includes(stubPath))
        .map((p) => p.pid);
    }
    const out: ProcInfo[] = [];
    const queue = [...roots];
    const seen = new Set<number>();
    while (queue.length) {
      const pid = queue.shift()!;
      if (seen.has(pid)) continue;
      seen.add(pid);
      const info = procInfo(pid);
      if (!info) continue;
      out.push(info);
      queue.push(...childrenOf(pid));
    }
    return out;
  };
}

/** The stub's root shell (its command line names the stub file) and all its descendants. */
export function bootstrapTree(init: number, stubPath: string): ProcInfo[] {
  const procs = containerProcesses(init);
  const roots = procs.filter((p) => p.cmdline.includes(stubPath));
  const inTree = new Set(roots.map((p) => p.pid));
  let grew = true;
  while (grew) {
    grew = false;
    for (const p of procs) {
      if (!inTree.has(p.pid) && inTree.has(p.ppid)) {
        inTree.add(p.pid);
        grew = true;
      }
    }
  }
  return procs.filter((p) => inTree.has(p.pid));
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // gone already
  }
}

/**
 * SIGKILL the whole tree at once: stop every member first (SIGSTOP, until
 * no new child appears), so nothing in it sees another die and reacts, then
 * SIGKILL them all. Returns the command lines killed.
 */
export function killTree(init: number, stubPath: string): ProcInfo[] {
  const stopped = new Map<number, ProcInfo>();
  for (let pass = 0; pass < 20; pass++) {
    const fresh = bootstrapTree(init, stubPath).filter((p) => !stopped.has(p.pid));
    if (fresh.length === 0) break;
    for (const p of fresh) {
      signal(p.pid, "SIGSTOP");
      stopped.set(p.pid, p);
    }
  }
  for (const p of stopped.values()) signal(p.pid, "SIGKILL");
  // nsenter (outside the host) stops itself when its child stops, and waits
  // for a SIGCONT that never comes: wake the parents of the tree's roots
  for (const p of stopped.values()) if (!stopped.has(p.ppid) && p.ppid > 1) signal(p.ppid, "SIGCONT");
  return [...stopped.values()];
}

interface LogRecord {
  run_id?: string;
  step?: string | null;
  event?: string;
  ts?: string;
}

/** Records appended to a JSON-lines log since `offset` (bytes). */
export function newRecords(file: string, offset: number): LogRecord[] {
  let text: string;
  try {
    const buf = readFileSync(file);
    text = buf.subarray(offset).toString("utf8");
  } catch {
    return [];
  }
  const out: LogRecord[] = [];
  for (const line of text.split("\n")) {
    if (!line.trim()) continue;
    try {
      out.push(JSON.parse(line) as LogRecord);
    } catch {
      // a line being written
    }
  }
  return out;
}

export function fileSize(file: string): number {
  try {
    return statSync(file).size;
  } catch {
    return 0;
  }
}

export interface TriggerContext {
  /** This machine's path of a path inside the host. */
  hostPath: (inside: string) => string;
  /** bootstrap.log inside the host. */
  logFile: string;
  /** Size of bootstrap.log when the run began: only later records count. */
  logOffset: number;
  /** The container's PID 1 (for the process tree). */
  init: () => number;
  stubPath: string;
}

/** True once the trigger's moment has come (polled). */
export function makeTriggerPoll(trigger: KillTrigger, ctx: TriggerContext): () => boolean {
  const t0 = Date.now();
  const tree = treeWatcher(ctx.init, ctx.stubPath);
  let stepStartedAt: number | null = null;
  return () => {
    switch (trigger.kind) {
      case "delay":
        return Date.now() - t0 >= trigger.ms;
      case "step-start":
        return newRecords(ctx.hostPath(ctx.logFile), ctx.logOffset).some((r) => r.event === "step_start" && r.step === trigger.step);
      case "step-fraction": {
        if (stepStartedAt === null) {
          const started = newRecords(ctx.hostPath(ctx.logFile), ctx.logOffset).some((r) => r.event === "step_start" && r.step === trigger.step);
          if (started) stepStartedAt = Date.now();
          return false;
        }
        return Date.now() - stepStartedAt >= trigger.fraction * trigger.expectedMs;
      }
      case "process":
        return tree().some((p) => trigger.pattern.test(p.cmdline));
      case "file":
        return trigger.test(ctx.hostPath);
    }
  };
}

export function describeTrigger(t: KillTrigger): string {
  switch (t.kind) {
    case "delay":
      return `${t.ms} ms after the start`;
    case "step-start":
      return `at ${t.step}'s start`;
    case "step-fraction":
      return `${Math.round(t.fraction * 100)} % into ${t.step} (~${t.expectedMs} ms)`;
    case "process":
      return `while ${t.pattern} runs`;
    case "file":
      return t.describe;
  }
}

/**
 * Wait until the trigger fires or `done` resolves (the run ended first).
 * Returns the ms from the call to the moment, or null when the run ended.
 */
export async function waitForTrigger(poll: () => boolean, done: Promise<unknown>, pollMs = 2): Promise<number | null> {
  const t0 = Date.now();
  let finished = false;
  void done.then(
    () => (finished = true),
    () => (finished = true),
  );
  for (;;) {
    if (finished) return null;
    try {
      if (poll()) return Date.now() - t0;
    } catch {
      // the host's files or /proc changed under us: try again
    }
    await sleep(pollMs);
  }
}
