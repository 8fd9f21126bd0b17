/**
 * Running commands on the machine that hosts the testbed: argv only, output
 * captured (and optionally streamed), a timeout that kills the process group.
 */
import { type SpawnOptions, spawn } from "node:child_process";

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  input?: string | Buffer;
  timeoutMs?: number;
  /** Called with every chunk of stdout/stderr as it arrives (live progress). */
  onOutput?: (chunk: string, stream: "stdout" | "stderr") => void;
  /** Resolve with the exit code instead of throwing on non-zero. */
  allowFailure?: boolean;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
  durationMs: number;
}

export class CommandError extends Error {
  constructor(
    readonly argv: readonly string[],
    readonly result: RunResult,
  ) {
    const tail = (result.stderr || result.stdout).trim().split("\n").slice(-15).join("\n");
    super(`command failed (exit ${result.code}): ${argv.join(" ")}\n${tail}`);
  }
}

export function run(argv: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const [cmd, ...args] = argv;
  if (!cmd) throw new Error("run: empty argv");
  const started = Date.now();
  const spawnOpts: SpawnOptions = {
    cwd: opts.cwd,
    env: opts.env ?? process.env,
    stdio: [opts.input === undefined ? "ignore" : "pipe", "pipe", "pipe"],
    detached: true, // own process group, so a timeout kills the whole tree
  };
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, spawnOpts);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout?.on("data", (b: Buffer) => {
      out.push(b);
      opts.onOutput?.(b.toString(), "stdout");
    });
    child.stderr?.on("data", (b: Buffer) => {
      err.push(b);
      opts.onOutput?.(b.toString(), "stderr");
    });
    let timedOut = false;
    const timer =
      opts.timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            timedOut = true;
            killGroup(child.pid, "SIGKILL");
          }, opts.timeoutMs);
    child.on("error", (e) => {
      if (timer) clearTimeout(timer);
      reject(e);
    });
    child.on("close", (code, signal) => {
      if (timer) clearTimeout(timer);
      const result: RunResult = {
        code: code ?? (signal ? 128 : 1),
        stdout: Buffer.concat(out).toString(),
        stderr: Buffer.concat(err).toString() + (timedOut ? `\n(timed out after ${opts.timeoutMs} ms)` : ""),
        durationMs: Date.now() - started,
      };
      if (result.code !== 0 && !opts.allowFailure) reject(new CommandError(argv, result));
      else resolve(result);
    });
    if (opts.input !== undefined) child.stdin?.end(opts.input);
  });
}

export function killGroup(pid: number | undefined, signal: NodeJS.Signals): void {
  if (!pid) return;
  try {
    process.kill(-pid, signal);
  } catch {
    // already gone
  }
}

/** True when `cmd` is on PATH. */
export async function haveCommand(cmd: string): Promise<boolean> {
  const r = await run(["sh", "-c", 'command -v "$1"', "sh", cmd], { allowFailure: true });
  return r.code === 0;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
