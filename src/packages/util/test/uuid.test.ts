import { describe, expect, it } from "vitest";
import { isValidUUID } from "../src/index.js";

describe("isValidUUID", () => {
  it("accepts a lowercase canonical UUID", () => {
    expect(isValidUUID("0f8fad5b-d9cb-469f-a165-70867728950e")).toBe(true);
    expect(isValidUUID("00000000-0000-0000-0000-000000000000")).toBe(true);
  });

  it.each([
    ["uppercase", "0F8FAD5B-D9CB-469F-A165-70867728950E"],
    ["no dashes", "0f8fad5bd9cb469fa16570867728950e"],
    ["braces", "{0f8fad5b-d9cb-469f-a165-70867728950e}"],
    ["too short", "0f8fad5b-d9cb-469f-a165-70867728950"],
    ["trailing newline", "0f8fad5b-d9cb-469f-a165-70867728950e\n"],
    ["non-hex", "0f8fad5b-d9cb-469f-a165-70867728950g"],
    ["empty", ""],
  ])("rejects %s", (_label, value) => {
    expect(isValidUUID(value)).toBe(false);
  });

  it("rejects non-strings", () => {
    expect(isValidUUID(undefined)).toBe(false);
    expect(isValidUUID(42)).toBe(false);
    expect(isValidUUID({})).toBe(false);
  });
});
