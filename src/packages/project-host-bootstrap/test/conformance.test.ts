/**
 * The shared conformance vectors in fixtures/configs/: the zod schema and
 * bootstrap.py must give every vector the recorded verdict and exactly the
 * recorded set of error paths, and, for a valid vector, the same parsed
 * output (defaults filled in). bootstrap.py checks every vector in one
 * python process, and a sample through its real CLI (`check-config --json`),
 * which must say the same.
 */
import { execFile, execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import * as contract from "../src/config.js";
import { checkConfig, formatPath } from "../src/config.js";

const FIXTURES = fileURLToPath(new URL("../fixtures/configs/", import.meta.url));
const BOOTSTRAP_PY = fileURLToPath(new URL("../python/bootstrap.py", import.meta.url));
// Resolved once: `python3` may be a shim (pyenv) that costs ~0.1 s per start.
const PYTHON = execFileSync(process.env.PYTHON ?? "python3", ["-c", "import sys; print(sys.executable)"], { encoding: "utf8" }).trim();

interface Vector {
  file: string;
  valid: boolean;
  description: string;
  config: unknown;
  errors: string[];
  output?: unknown;
}

interface PythonVerdict {
  ok: boolean;
  errors: string[];
  config?: unknown;
}

function loadVectors(kind: "valid" | "invalid"): Vector[] {
  const dir = join(FIXTURES, kind);
  return readdirSync(dir)
    .filter((f) => f.endsWith(".json"))
    .sort()
    .map((f) => {
      const v = JSON.parse(readFileSync(join(dir, f), "utf8"));
      return { file: `${kind}/${f}`, valid: kind === "valid", errors: [], ...v };
    });
}

const vectors = [...loadVectors("valid"), ...loadVectors("invalid")];
const uniqueSorted = (xs: string[]) => [...new Set(xs)].sort();

/** JSON text of a config; JSON.stringify would turn a vector's 1e400 (Infinity) into null. */
function configText(config: unknown): string {
  const marker = "__non_finite_number__";
  const text = JSON.stringify(config, (_k, v) => (typeof v === "number" && !Number.isFinite(v) ? `${marker}${v}` : v));
  return text.replace(new RegExp(`"${marker}(-?)Infinity"`, "g"), "$11e400");
}

function verdictOf(out: { ok: boolean; errors?: { path: string }[]; config?: unknown }): PythonVerdict {
  return { ok: out.ok, errors: uniqueSorted((out.errors ?? []).map((e) => e.path)), config: out.config };
}

/** Every config through one python process: Config.from_dict, to_dict and
 * issue_json, as `check-config --json` uses them (a process per vector costs
 * ~0.2 s each on this machine). */
const BATCH_DRIVER = `
import json, sys
sys.path.insert(0, sys.argv[1])
import bootstrap
for line in sys.stdin:
    try:
        out = {"ok": True, "config": bootstrap.Config.from_dict(json.loads(line)).to_dict()}
    except bootstrap.ConfigError as e:
        out = {"ok": False, "errors": [bootstrap.issue_json(i) for i in e.issues]}
    print(json.dumps(out), flush=True)
`;

function runPythonBatch(configs: unknown[]): PythonVerdict[] {
  const stdout = execFileSync(PYTHON, ["-c", BATCH_DRIVER, dirname(BOOTSTRAP_PY)], {
    input: configs.map((c) => `${configText(c)}\n`).join(""),
    encoding: "utf8",
  });
  return stdout
    .trim()
    .split("\n")
    .map((line) => JSON.parse(line))
    .map(verdictOf);
}

/** The real CLI, as the stub and the hub run it. */
function runPythonCli(configPath: string): Promise<{ exitCode: number; verdict: PythonVerdict }> {
  return new Promise((resolve, reject) => {
    execFile(PYTHON, [BOOTSTRAP_PY, "--json", "--config", configPath, "check-config"], (error, stdout, stderr) => {
      const exitCode = error ? (typeof error.code === "number" ? error.code : -1) : 0;
      try {
        resolve({ exitCode, verdict: verdictOf(JSON.parse(stdout)) });
      } catch {
        reject(new Error(`bootstrap.py check-config ${configPath}: exit ${exitCode}, stdout ${stdout}, stderr ${stderr}`));
      }
    });
  });
}

describe("conformance vectors", () => {
  it("cover enough cases and are well formed", () => {
    expect(vectors.length).toBeGreaterThanOrEqual(30);
    expect(vectors.filter((v) => v.valid).length).toBeGreaterThanOrEqual(5);
    for (const v of vectors) {
      expect(typeof v.description, v.file).toBe("string");
      expect(v.config, v.file).toBeDefined();
      if (!v.valid) {
        expect(v.errors.length, `${v.file} records no error paths`).toBeGreaterThan(0);
        expect(v.errors, `${v.file} errors must be sorted and unique`).toEqual(uniqueSorted(v.errors));
      }
    }
  });

  describe.each(vectors.map((v) => [v.file, v] as const))("zod: %s", (_file, v) => {
    it("gives the recorded verdict and error paths", () => {
      const r = checkConfig(v.config);
      const paths = r.ok ? [] : uniqueSorted(r.issues.map((i) => formatPath(i.path)));
      expect({ ok: r.ok, errors: paths }).toEqual({ ok: v.valid, errors: v.errors });
      if (r.ok && v.output !== undefined) expect(r.config).toEqual(v.output);
    });
  });

  it("bootstrap.py's regexes and constants are twins of config.ts's", () => {
    const names = [
      "SHA256_RE",
      "UUID_RE",
      "USER_RE",
      "HOST_NAME_RE",
      "VERSION_RE",
      "NODE_VERSION_RE",
      "DEB_PACKAGE_RE",
      "ENV_NAME_RE",
      "SECRET_NAME_RE",
      "OS_ID_RE",
      "OS_VERSION_RE",
      "SYSTEMD_UNIT_RE",
    ] as const;
    const script = `import json, sys; sys.path.insert(0, sys.argv[1]); import bootstrap as b
print(json.dumps({"patterns": {n: getattr(b, n).pattern for n in sys.argv[2:]}, "MAX_PATH": b.MAX_PATH,
  "ARCHES": list(b.ARCHES), "SCHEMA_VERSION": b.SCHEMA_VERSION}))`;
    const py = JSON.parse(execFileSync(PYTHON, ["-c", script, dirname(BOOTSTRAP_PY), ...names], { encoding: "utf8" }));
    // Python uses fullmatch(), so its twin is the JS source without ^ and $.
    // biome-ignore lint/performance/noDynamicNamespaceImportAccess: a test walking the contract's names
    for (const name of names) expect(`^${py.patterns[name]}$`, name).toBe(contract[name].source);
    expect(py.MAX_PATH).toBe(contract.MAX_PATH);
    expect(py.ARCHES).toEqual([...contract.ARCHES]);
    expect(py.SCHEMA_VERSION).toBe(contract.SCHEMA_VERSION);
  });

  describe("bootstrap.py", () => {
    const verdicts = new Map<string, PythonVerdict>();
    beforeAll(() => {
      runPythonBatch(vectors.map((v) => v.config)).forEach((verdict, i) => {
        verdicts.set(vectors[i]!.file, verdict);
      });
    });

    it.each(vectors.map((v) => [v.file, v] as const))("%s: same verdict, paths and output as zod and the recording", (file, v) => {
      const py = verdicts.get(file)!;
      const zod = checkConfig(v.config);
      const zodPaths = zod.ok ? [] : uniqueSorted(zod.issues.map((i) => formatPath(i.path)));
      expect({ ok: py.ok, errors: py.errors }).toEqual({ ok: v.valid, errors: v.errors });
      expect(py.errors).toEqual(zodPaths);
      if (zod.ok) {
        expect(py.config).toEqual(zod.config);
        if (v.output !== undefined) expect(py.config).toEqual(v.output);
      }
    });

    describe("through the CLI (check-config --json)", () => {
      let work: string;
      beforeAll(() => {
        work = mkdtempSync(join(tmpdir(), "phb-conformance-"));
      });
      afterAll(() => rmSync(work, { recursive: true, force: true }));

      // One valid vector, one with many errors, one that only survives as JSON text (1e400).
      const sample = ["valid/full.json", "invalid/several-errors-at-once.json", "invalid/numbers-out-of-range.json"];
      it.each(sample)("%s: exit code and verdict as in-process", async (file) => {
        const v = vectors.find((x) => x.file === file)!;
        const path = join(work, file.replace("/", "-"));
        writeFileSync(path, configText(v.config));
        const cli = await runPythonCli(path);
        expect(cli.exitCode).toBe(v.valid ? 0 : 2);
        expect(cli.verdict).toEqual(verdicts.get(file));
      });
    });
  });
});
