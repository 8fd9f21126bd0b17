/**
 * bootstrap.py's config check as a long-running process, for the differential
 * fuzzer: the SHIPPED python/bootstrap.py, imported, reading one config (JSON
 * text) per line and answering with exactly what `check-config --json` prints
 * (the same functions: parse_config_text, Config.from_dict, to_dict,
 * issue_json), on one line. Anything else that escapes (an internal error, which
 * would be exit 1 from the CLI) is answered as `{"crash": traceback}`.
 * `runCheckConfigCli` runs the real CLI on a file, to show the two agree.
 * FUZZ_DEBUG=<file> appends every config text sent (to find the one a hung run was on).
 */
import { type ChildProcessWithoutNullStreams, execFile, execFileSync, spawn } from "node:child_process";
import { appendFileSync } from "node:fs";
import { dirname } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

export const BOOTSTRAP_PY = fileURLToPath(new URL("../python/bootstrap.py", import.meta.url));
export const PYTHON = execFileSync(process.env.PYTHON ?? "python3", ["-c", "import sys; print(sys.executable)"], { encoding: "utf8" }).trim();

export interface CheckConfigOutput {
  ok?: boolean;
  config?: unknown;
  errors?: { path: string; message: string; value?: unknown }[];
  crash?: string;
}

const DRIVER = `
import json, sys, traceback
sys.path.insert(0, sys.argv[1])
import bootstrap
for line in sys.stdin:
    try:
        try:
            config = bootstrap.Config.from_dict(bootstrap.parse_config_text(line, "fuzz"), "fuzz")
            out = {"ok": True, "config": config.to_dict()}
        except bootstrap.ConfigError as e:
            out = {"ok": False, "errors": [bootstrap.issue_json(i) for i in e.issues]}
            e.message.encode("utf-8", "backslashreplace")  # what the CLI prints to stderr
        text = json.dumps(out, allow_nan=False)  # as check-config --json prints it: strict JSON
    except BaseException:
        text = json.dumps({"crash": traceback.format_exc()})
    print(text, flush=True)
`;

/** JSON text of a config; JSON.stringify would turn Infinity (a vector's 1e400) into null. */
export function configText(config: unknown): string {
  const marker = "__non_finite_number__";
  const text = JSON.stringify(config, (_k, v) => (typeof v === "number" && !Number.isFinite(v) ? `${marker}${v}` : v));
  return text.replace(new RegExp(`"${marker}(-?)Infinity"`, "g"), "$11e400").replace(new RegExp(`"${marker}NaN"`, "g"), "null");
}

export class PythonCheckConfig {
  private readonly child: ChildProcessWithoutNullStreams;
  private readonly waiting: ((line: string) => void)[] = [];
  private stderr = "";

  constructor() {
    const env = { ...process.env, PYTHONUTF8: "1" }; // stdin and stdout in UTF-8 whatever the locale
    this.child = spawn(PYTHON, ["-c", DRIVER, dirname(BOOTSTRAP_PY)], { stdio: ["pipe", "pipe", "pipe"], env });
    this.child.stderr.on("data", (chunk: Buffer) => {
      this.stderr += chunk.toString();
    });
    createInterface({ input: this.child.stdout }).on("line", (line) => this.waiting.shift()?.(line));
  }

  /** The verdict for one config text (must not contain a raw newline: JSON text never needs one). */
  check(text: string): Promise<CheckConfigOutput> {
    if (text.includes("\n")) throw new Error("one config per line: serialise without raw newlines");
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`bootstrap.py did not answer within 30 s; stderr: ${this.stderr}`)), 30_000);
      this.waiting.push((line) => {
        clearTimeout(timer);
        try {
          resolve(JSON.parse(line) as CheckConfigOutput);
        } catch (e) {
          reject(new Error(`bootstrap.py answered with invalid JSON (${String(e)}): ${line.slice(0, 500)}`));
        }
      });
      if (process.env.FUZZ_DEBUG) appendFileSync(process.env.FUZZ_DEBUG, `${JSON.stringify(text)}\n`);
      this.child.stdin.write(`${text}\n`);
    });
  }

  close(): void {
    this.child.stdin.end();
  }
}

/** The real CLI: `bootstrap.py --json --config PATH check-config`. */
export function runCheckConfigCli(configPath: string): Promise<{ exitCode: number; output: CheckConfigOutput | null; stderr: string }> {
  return new Promise((resolve) => {
    execFile(PYTHON, [BOOTSTRAP_PY, "--json", "--config", configPath, "check-config"], { maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      const exitCode = error ? (typeof error.code === "number" ? error.code : -1) : 0;
      let output: CheckConfigOutput | null = null;
      try {
        output = JSON.parse(stdout) as CheckConfigOutput;
      } catch {
        output = null;
      }
      resolve({ exitCode, output, stderr });
    });
  });
}
