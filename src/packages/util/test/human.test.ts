import { describe, expect, it } from "vitest";
import { humanBytes, humanDuration } from "../src/human.js";

describe("humanDuration", () => {
  it.each([
    [0, "0ms"],
    [0.25, "250ms"],
    [0.9994, "999ms"],
    [1, "1.0s"],
    [5.04, "5.0s"],
    [59.9, "59.9s"],
    [59.96, "1m 00s"],
    [65, "1m 05s"],
    [600, "10m 00s"],
    [3725, "1h 02m 05s"],
    [86399, "23h 59m 59s"],
    [90061, "1d 01h 01m"],
    [-65, "-1m 05s"],
  ])("%s s -> %s", (seconds, text) => {
    expect(humanDuration(seconds)).toBe(text);
  });

  it("rejects NaN and infinities", () => {
    expect(() => humanDuration(Number.NaN)).toThrow(RangeError);
    expect(() => humanDuration(Number.POSITIVE_INFINITY)).toThrow(/not a finite number/);
  });
});

describe("humanBytes", () => {
  it.each([
    [0, "0 B"],
    [512, "512 B"],
    [1023, "1023 B"],
    [1024, "1.0 KiB"],
    [1536, "1.5 KiB"],
    [10 * 1024, "10 KiB"],
    [1048575, "1.0 MiB"],
    [1.5 * 1024 ** 3, "1.5 GiB"],
    [100 * 1024 ** 3, "100 GiB"],
    [2 * 1024 ** 4, "2.0 TiB"],
    [-1536, "-1.5 KiB"],
  ])("%s -> %s", (bytes, text) => {
    expect(humanBytes(bytes)).toBe(text);
  });

  it("rejects NaN", () => {
    expect(() => humanBytes(Number.NaN)).toThrow(RangeError);
  });
});
