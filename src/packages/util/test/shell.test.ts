import { execFileSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { shellQuote } from "../src/index.js";

const NASTY = [
  "",
  "plain",
  "with space",
  "it's",
  "'",
  "''",
  "$HOME",
  "$(id)",
  "`id`",
  "a\nb",
  "back\\slash",
  "*",
  "~",
  "a;b|c&d",
  "!event",
  "-n",
  'double "quoted"',
  "tab\there",
  "FOO=bar",
  "{a,b}",
];

// Each shell prints its words back, one per line, NUL-terminated so that
// values with newlines survive the round trip.
function echoThrough(shell: string, words: string[]): string[] {
  const script = `for w in ${words.map(shellQuote).join(" ")}; do printf '%s\\0' "$w"; done`;
  const out = execFileSync(shell, ["-c", script], { encoding: "utf8" });
  return out.split("\0").slice(0, -1);
}

describe("shellQuote", () => {
  it("keeps simple words bare and quotes everything else", () => {
    expect(shellQuote("/home/ubuntu/cocalc-host")).toBe("/home/ubuntu/cocalc-host");
    expect(shellQuote("http://hub:8080/api/x")).toBe("http://hub:8080/api/x");
    expect(shellQuote("")).toBe("''");
    expect(shellQuote("it's")).toBe("'it'\\''s'");
    expect(shellQuote("FOO=bar")).toBe("'FOO=bar'");
  });

  it.each(["sh", "bash"])("round-trips nasty values through %s", (shell) => {
    expect(echoThrough(shell, NASTY)).toEqual(NASTY);
  });

  it("refuses NUL", () => {
    expect(() => shellQuote("a\0b")).toThrow(/NUL/);
  });
});
