import { describe, expect, it } from "vitest";
import { nativeDebianArch, withCredentialsFlag } from "../src/machine.js";
import { e2eTarget } from "../src/targets.js";

describe("e2e targets (E2E_SUITE, E2E_ARCH)", () => {
  it("defaults to bookworm on this machine's arch", () => {
    expect(e2eTarget({})).toEqual({ suite: "bookworm", arch: nativeDebianArch(), os: { id: "debian", min_version: "12" } });
  });

  it("trixie on arm64 requires Debian 13 of its hosts", () => {
    expect(e2eTarget({ E2E_SUITE: "trixie", E2E_ARCH: "arm64" })).toEqual({ suite: "trixie", arch: "arm64", os: { id: "debian", min_version: "13" } });
  });

  it("an unknown release or arch is an error naming the variable and the choices", () => {
    expect(() => e2eTarget({ E2E_SUITE: "noble" })).toThrow(/E2E_SUITE="noble": use one of bookworm, trixie/);
    expect(() => e2eTarget({ E2E_ARCH: "riscv64" })).toThrow(/E2E_ARCH="riscv64": use one of amd64, arm64/);
  });
});

describe("binfmt_misc registration for emulated hosts", () => {
  const line = ":qemu-aarch64:M::\\x7f\\x45\\x4c\\x46:\\xff\\xff\\xff\\xff:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF";
  it("adds the C flag (setuid sudo works in the host), once", () => {
    expect(withCredentialsFlag(line)).toBe(line.replace(/:OPF$/, ":OPFC"));
    expect(withCredentialsFlag(withCredentialsFlag(line))).toBe(withCredentialsFlag(line));
  });
  it("refuses what is not a registration line", () => {
    expect(() => withCredentialsFlag("qemu-aarch64 OPF")).toThrow(/not a binfmt_misc registration line/);
  });
});
