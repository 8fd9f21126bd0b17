/**
 * The event schema refuses text a database cannot store (NUL, unpaired
 * surrogates) in every free-text field, naming the field, and accepts
 * everything else Unicode allows.
 */
import { describe, expect, it } from "vitest";
import { EventBatchSchema, isStorableText } from "../src/events.js";

const HOST = "0b0e2f4a-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
const base = { run_id: "run-0123456789", ts: 1_750_000_000 };

function batch(event: Record<string, unknown>) {
  return { host_id: HOST, events: [{ ...base, seq: 0, ...event }] };
}

const fields: [string, (text: string) => Record<string, unknown>][] = [
  ["message", (t) => ({ type: "step_end", step: "apt", outcome: "failed", duration_s: 1, message: t })],
  ["hint", (t) => ({ type: "step_end", step: "apt", outcome: "failed", duration_s: 1, hint: t })],
  ["log_tail", (t) => ({ type: "run_end", ok: false, wall_s: 1, log_tail: t })],
  ["phase", (t) => ({ type: "progress", phase: t, percent: 1 })],
  ["version", (t) => ({ type: "run_start", version: t, parallel: true, steps: [] })],
];

describe("event text", () => {
  for (const [field, make] of fields) {
    for (const [bad, what] of [
      ["a\u0000b", "NUL"],
      ["a\ud800b", "a lone high surrogate"],
      ["\udfff", "a lone low surrogate"],
      ["\udc00\ud800", "surrogates in the wrong order"],
    ] as const) {
      it(`refuses ${what} in ${field}, naming it`, () => {
        const r = EventBatchSchema.safeParse(batch(make(bad)));
        expect(r.success).toBe(false);
        expect(r.error?.issues.map((i) => i.path.join("."))).toEqual([`events.0.${field}`]);
        expect(r.error?.issues[0]?.message).toMatch(/NUL \(U\+0000\) or unpaired surrogates/);
      });
    }
    it(`accepts any other Unicode in ${field} (paired surrogates, U+FFFD, controls other than NUL)`, () => {
      expect(EventBatchSchema.safeParse(batch(make("ok 😀 \uFFFD \u0001\t\n é"))).success).toBe(true);
    });
  }

  it("isStorableText agrees with String.prototype.isWellFormed plus no NUL", () => {
    const samples = ["", "a", "\u0000", "😀", "\ud83d", "\ude00", "\ude00\ud83d", "x\ud83d\ude00y", "\ud800\ud800\udc00"];
    for (const s of samples) {
      const wellFormed = (s as unknown as { isWellFormed(): boolean }).isWellFormed();
      expect(isStorableText(s), JSON.stringify(s)).toBe(wellFormed && !s.includes("\u0000"));
    }
  });
});
