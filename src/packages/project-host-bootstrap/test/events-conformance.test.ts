/**
 * The shared event vectors in fixtures/events/: the zod schema
 * (src/events.ts) and bootstrap.py's check_event must give every vector the
 * recorded verdict and exactly the recorded set of error paths, and, for a
 * valid vector, the same parsed output (defaults filled in). bootstrap.py
 * checks every vector in one python process. The enums and limits of both
 * sides are compared too, so neither side sends what the other refuses.
 */
import { execFileSync } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { beforeAll, describe, expect, it } from "vitest";
import { formatPath } from "../src/config.js";
import * as events from "../src/events.js";
import { BootstrapEventSchema } from "../src/events.js";

const FIXTURES = fileURLToPath(new URL("../fixtures/events/", import.meta.url));
const BOOTSTRAP_PY = fileURLToPath(new URL("../python/bootstrap.py", import.meta.url));
const PYTHON = execFileSync(process.env.PYTHON ?? "python3", ["-c", "import sys; print(sys.executable)"], { encoding: "utf8" }).trim();

interface Vector {
  file: string;
  valid: boolean;
  description: string;
  event: unknown;
  errors: string[];
  output?: unknown;
}

interface Verdict {
  ok: boolean;
  errors: string[];
  output?: unknown;
}

const uniqueSorted = (xs: string[]) => [...new Set(xs)].sort();

function loadVectors(kind: "valid" | "invalid"): Vector[] {
  const dir = join(FIXTURES, kind);
  return readdirSync(dir)
    .filter((f) => f.endsWith(".json"))
    .sort()
    .map((f) => ({ file: `${kind}/${f}`, valid: kind === "valid", errors: [], ...JSON.parse(readFileSync(join(dir, f), "utf8")) }));
}

const vectors = [...loadVectors("valid"), ...loadVectors("invalid")];

function zodVerdict(event: unknown): Verdict {
  const r = BootstrapEventSchema.safeParse(event);
  if (r.success) return { ok: true, errors: [], output: r.data };
  return { ok: false, errors: uniqueSorted(r.error.issues.map((i) => formatPath(i.path.map((p) => (typeof p === "symbol" ? String(p) : p))))) };
}

// The vector files as text, so Python reads 3.0 as JSON wrote it (JSON.stringify would make it 3).
const BATCH_DRIVER = `
import json, sys
sys.path.insert(0, sys.argv[1])
import bootstrap
for path in sys.argv[2:]:
    event = json.loads(open(path, encoding="utf-8").read())["event"]
    try:
        out = {"ok": True, "errors": [], "output": bootstrap.check_event(event)}
    except bootstrap.EventError as e:
        out = {"ok": False, "errors": sorted({p for p, _ in e.issues})}
    print(json.dumps(out), flush=True)
`;

describe("event vectors", () => {
  it("cover every event type and outcome, and are well formed", () => {
    expect(vectors.filter((v) => v.valid).length).toBeGreaterThanOrEqual(10);
    expect(vectors.filter((v) => !v.valid).length).toBeGreaterThanOrEqual(20);
    const valid = vectors.filter((v) => v.valid).map((v) => v.event as { type: string; outcome?: string });
    expect(new Set(valid.map((e) => e.type))).toEqual(new Set(events.BootstrapEventSchema.options.map((o) => o.shape.type.value)));
    expect(new Set(valid.filter((e) => e.type === "step_end").map((e) => e.outcome))).toEqual(new Set(events.STEP_OUTCOMES));
    for (const v of vectors) {
      expect(typeof v.description, v.file).toBe("string");
      if (!v.valid) {
        expect(v.errors.length, `${v.file} records no error paths`).toBeGreaterThan(0);
        expect(v.errors, `${v.file}: errors sorted and unique`).toEqual(uniqueSorted(v.errors));
      } else {
        expect(v.output, `${v.file} records no output`).toBeDefined();
      }
    }
  });

  it.each(vectors.map((v) => [v.file, v] as const))("zod: %s gives the recorded verdict", (_file, v) => {
    const r = zodVerdict(v.event);
    expect({ ok: r.ok, errors: r.errors }).toEqual({ ok: v.valid, errors: v.errors });
    if (r.ok) expect(r.output).toEqual(v.output);
  });

  describe("bootstrap.py", () => {
    const verdicts = new Map<string, Verdict>();
    beforeAll(() => {
      const files = vectors.map((v) => join(FIXTURES, v.file));
      const lines = execFileSync(PYTHON, ["-c", BATCH_DRIVER, dirname(BOOTSTRAP_PY), ...files], { encoding: "utf8", maxBuffer: 64 << 20 })
        .trim()
        .split("\n");
      lines.forEach((line, i) => {
        verdicts.set(vectors[i]!.file, JSON.parse(line) as Verdict);
      });
    });

    it.each(vectors.map((v) => [v.file, v] as const))("%s: same verdict, paths and output as zod", (file, v) => {
      const py = verdicts.get(file)!;
      expect(py).toEqual(zodVerdict(v.event));
    });

    it("has the same enums and limits as src/events.ts", () => {
      const script = `import json, sys; sys.path.insert(0, sys.argv[1]); import bootstrap as b
print(json.dumps({"outcomes": [o.value for o in b.Outcome], "types": [t.value for t in b.EventType],
  "RUN_ID_RE": b.RUN_ID_RE.pattern, "STEP_NAME_RE": b.STEP_NAME_RE.pattern, "MAX_TEXT": b.MAX_TEXT,
  "EVENT_BATCH_MAX": b.EVENT_BATCH_MAX, "EVENT_BATCH_BYTES": b.EVENT_BATCH_BYTES}))`;
      const py = JSON.parse(execFileSync(PYTHON, ["-c", script, dirname(BOOTSTRAP_PY)], { encoding: "utf8" }));
      expect(py.outcomes).toEqual([...events.STEP_OUTCOMES]);
      expect(py.types).toEqual(events.BootstrapEventSchema.options.map((o) => o.shape.type.value));
      expect(`^${py.RUN_ID_RE}$`).toBe(events.RUN_ID_RE.source);
      expect(`^${py.STEP_NAME_RE}$`).toBe(events.STEP_NAME_RE.source);
      expect(py.MAX_TEXT).toBe(events.MAX_TEXT);
      expect(py.EVENT_BATCH_MAX).toBe(events.MAX_EVENTS_PER_BATCH);
      expect(py.EVENT_BATCH_BYTES).toBeLessThan(events.MAX_BATCH_BYTES);
    });
  });
});
