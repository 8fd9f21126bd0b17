/**
 * The critical path's one definition: src/timings.ts and bootstrap.py's
 * critical_path against the shared vectors in fixtures/critical-path/
 * (python/tests/test_timings.py runs the same files), and a run's step
 * timings folded from a real spool that bootstrap.py wrote.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { criticalPath, runTimings, type StepDuration } from "../src/timings.js";

const FIXTURES = fileURLToPath(new URL("../fixtures/critical-path/", import.meta.url));
const BOOTSTRAP_PY = fileURLToPath(new URL("../python/bootstrap.py", import.meta.url));
const PYTHON = execFileSync(process.env.PYTHON ?? "python3", ["-c", "import sys; print(sys.executable)"], { encoding: "utf8" }).trim();

interface Vector {
  file: string;
  description: string;
  steps: StepDuration[];
  path?: string[];
  seconds?: number;
  error?: string;
}

const vectors: Vector[] = readdirSync(FIXTURES)
  .filter((f) => f.endsWith(".json"))
  .sort()
  .map((f) => ({ file: f, ...JSON.parse(readFileSync(join(FIXTURES, f), "utf8")) }));

describe("critical path vectors", () => {
  it("are enough, and each records a path or an error", () => {
    expect(vectors.length).toBeGreaterThanOrEqual(8);
    for (const v of vectors) expect(v.error !== undefined || (v.path !== undefined && v.seconds !== undefined), v.file).toBe(true);
  });

  it.each(vectors.map((v) => [v.file, v] as const))("src/timings.ts: %s", (_f, v) => {
    if (v.error) {
      expect(() => criticalPath(v.steps)).toThrow(new RegExp(v.error));
      return;
    }
    const r = criticalPath(v.steps);
    expect(r.path).toEqual(v.path);
    expect(r.seconds).toBeCloseTo(v.seconds!, 9);
  });

  it("bootstrap.py's critical_path gives the same answers", () => {
    const script = `import json, sys; sys.path.insert(0, sys.argv[1]); import bootstrap
out = []
for path in sys.argv[2:]:
    v = json.load(open(path))
    try:
        p, s = bootstrap.critical_path(v["steps"])
        out.append({"path": p, "seconds": s})
    except ValueError as e:
        out.append({"error": str(e)})
print(json.dumps(out))`;
    const py = JSON.parse(execFileSync(PYTHON, ["-c", script, dirname(BOOTSTRAP_PY), ...vectors.map((v) => join(FIXTURES, v.file))], { encoding: "utf8" })) as {
      path?: string[];
      seconds?: number;
      error?: string;
    }[];
    vectors.forEach((v, i) => {
      const got = py[i]!;
      if (v.error) expect(got.error, v.file).toMatch(new RegExp(v.error));
      else {
        expect(got.path, v.file).toEqual(v.path);
        expect(got.seconds!, v.file).toBeCloseTo(v.seconds!, 9);
      }
    });
  });
});

describe("runTimings", () => {
  it("folds a spool bootstrap.py wrote: plan order, start and end since run_start, blocked steps included", () => {
    const dir = mkdtempSync(join(tmpdir(), "phb-timings-"));
    try {
      const script = `import sys, time; sys.path.insert(0, sys.argv[1]); import bootstrap as b
from pathlib import Path
s = b.EventSpool(Path(sys.argv[2]), "20261201T000000000000Z-0123abcd")
s.emit(b.RunStartEvent("0.3.0", True, (b.StepInfo("a", (), 1.0), b.StepInfo("b", ("a",), 1.0), b.StepInfo("c", ("b",), 1.0))))
s.emit(b.StepStartEvent("a")); time.sleep(0.05)
s.emit(b.StepEndEvent("a", b.Outcome.CHANGED, 0.05))
s.emit(b.StepStartEvent("b"))
s.emit(b.StepEndEvent("b", b.Outcome.FAILED, 0.0, "applied, but x"))
s.emit(b.StepEndEvent("c", b.Outcome.BLOCKED, 0.0, "blocked: b failed"))
s.emit(b.RunEndEvent(False, 0.06, failed_step="b"))
s.close()
print(s.path)`;
      const spool = execFileSync(PYTHON, ["-c", script, dirname(BOOTSTRAP_PY), dir], { encoding: "utf8" }).trim();
      const lines = readFileSync(spool, "utf8").split("\n");
      const run = runTimings([...lines, '{"torn']);
      expect(run).toMatchObject({ run_id: "20261201T000000000000Z-0123abcd", ok: false, parallel: true, wall_s: 0.06 });
      expect(run.steps.map((s) => [s.name, s.outcome, s.deps])).toEqual([
        ["a", "changed", []],
        ["b", "failed", ["a"]],
        ["c", "blocked", ["b"]],
      ]);
      expect(run.steps[0]!.end_s).toBeGreaterThanOrEqual(0.05);
      expect(run.steps[1]!.start_s).toBeGreaterThanOrEqual(run.steps[0]!.end_s);
      expect(run.steps[2]!.start_s).toBe(run.steps[2]!.end_s);
      expect(() => runTimings(lines.slice(1))).toThrow(/run_start/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
