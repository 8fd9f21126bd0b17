/**
 * Provider user-data (src/userdata.ts): every placement renders from the real
 * stub; every `#cloud-config` is validated by cloud-init's own schema
 * validator (Debian's cloud-init package, installed by scripts/setup.sh with
 * /etc/cloud/cloud-init.disabled so it never acts on this machine) and parsed
 * back with the YAML loader cloud-init uses, giving the stub's exact bytes.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { buildBootstrapConfig } from "../src/builders.js";
import { renderStub, stubOptionsFor } from "../src/stub.js";
import {
  CLOUD_CONFIG_STUB_PATH,
  renderUserData,
  USER_DATA_PLACEMENTS,
  type UserDataPlacement,
  UserDataError,
} from "../src/userdata.js";
import { EXAMPLE_BASE_URL, EXAMPLE_TOKEN, exampleHostFacts } from "../scripts/example-host.js";

const stub = renderStub(stubOptionsFor(buildBootstrapConfig(exampleHostFacts()), { baseUrl: EXAMPLE_BASE_URL, token: EXAMPLE_TOKEN }));

function haveCloudInit(): boolean {
  return spawnSync("cloud-init", ["--version"], { encoding: "utf8" }).status === 0;
}

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "phb-userdata-"));
  if (!haveCloudInit()) {
    throw new Error("cloud-init is not installed: run `bash scripts/setup.sh` as root (it installs Debian's cloud-init, disabled)");
  }
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function validate(text: string, name: string): { status: number | null; out: string } {
  const file = join(dir, name);
  writeFileSync(file, text, { mode: 0o600 });
  const r = spawnSync("cloud-init", ["schema", "--config-file", file], { encoding: "utf8" });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

/** Parse with PyYAML's safe loader (what cloud-init itself uses). */
function parseYaml(text: string): unknown {
  const r = spawnSync("python3", ["-c", "import json,sys,yaml; print(json.dumps(yaml.safe_load(sys.stdin.read())))"], {
    input: text,
    encoding: "utf8",
  });
  if (r.status !== 0) throw new Error(`yaml: ${r.stderr}`);
  return JSON.parse(r.stdout) as unknown;
}

describe("renderUserData", () => {
  it.each(["gcp-startup-script", "user-data-script"] as const)("%s is the stub itself, a #!/bin/sh script", (placement) => {
    const text = renderUserData(placement, stub);
    expect(text).toBe(stub);
    expect(text.startsWith("#!/bin/sh\n")).toBe(true);
  });

  it.each(["nebius-cloud-config", "multipass-cloud-config"] as const)(
    "%s passes cloud-init's schema validator and carries the stub byte for byte in a 0700 root file",
    (placement) => {
      const text = renderUserData(placement, stub);
      expect(text.startsWith("#cloud-config\n")).toBe(true);
      const v = validate(text, `${placement}.yaml`);
      expect(v.out).not.toMatch(/error/i);
      expect(v.status).toBe(0);
      const doc = parseYaml(text) as { write_files: Record<string, unknown>[]; runcmd: string[][] };
      expect(doc.write_files).toEqual([{ path: CLOUD_CONFIG_STUB_PATH, owner: "root:root", permissions: "0700", content: stub }]);
      // The stub (and its token) is a file, never an argument of a process.
      expect(doc.runcmd).toEqual([["sh", CLOUD_CONFIG_STUB_PATH]]);
      expect(JSON.stringify(doc.runcmd)).not.toContain(EXAMPLE_TOKEN);
    },
  );

  it("keeps awkward stub bytes exact through YAML (quotes, backslashes, tabs, non-ASCII, a YAML-looking line)", () => {
    const awkward = `${stub}# "q" 'q' \\ \t tab — é ✓\n---\nkey: value # not YAML\n`;
    const text = renderUserData("nebius-cloud-config", awkward);
    expect(validate(text, "awkward.yaml").status).toBe(0);
    expect((parseYaml(text) as { write_files: { content: string }[] }).write_files[0]?.content).toBe(awkward);
  });

  it("the validator used here does refuse a broken #cloud-config (so the passes above mean something)", () => {
    const v = validate("#cloud-config\nruncmd: 5\nwrite_files: [{path: 7}]\n", "broken.yaml");
    expect(v.status).not.toBe(0);
    expect(v.out).toMatch(/runcmd/);
  });

  it("covers every placement", () => {
    for (const placement of USER_DATA_PLACEMENTS) expect(() => renderUserData(placement, stub)).not.toThrow();
  });

  it("refuses what is not a rendered stub, and an unknown placement, naming the argument", () => {
    expect(() => renderUserData("user-data-script", "echo hi\n")).toThrow(UserDataError);
    expect(() => renderUserData("user-data-script", "echo hi\n")).toThrow(/^stub: /);
    expect(() => renderUserData("user-data-script", `${stub}\0`)).toThrow(/NUL/);
    expect(() => renderUserData("aws" as UserDataPlacement, stub)).toThrow(/^placement: unknown "aws"; use one of gcp-startup-script/);
  });
});
