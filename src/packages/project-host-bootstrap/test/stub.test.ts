/**
 * The rendered stub as text: shellcheck- and `sh -n`-clean, every value
 * quoted (checked by letting sh itself read the values back), options
 * validated, and a truncated download runs nothing.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { EXAMPLE_BASE_URL, EXAMPLE_TOKEN, exampleHostFacts } from "../scripts/example-host.js";
import { bootstrapPySha256 } from "../src/asset.js";
import { BootstrapConfigError, buildBootstrapConfig } from "../src/builders.js";
import { renderStub, STUB_SH_PATH, type StubOptions, stubOptionsFor } from "../src/stub.js";

const SHELLCHECK = fileURLToPath(new URL("../../../../.venv/bin/shellcheck", import.meta.url));
const work = mkdtempSync(join(tmpdir(), "phb-stubtext-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));

const exampleStub = () => renderStub(stubOptionsFor(buildBootstrapConfig(exampleHostFacts()), { baseUrl: EXAMPLE_BASE_URL, token: EXAMPLE_TOKEN }));

// Shell syntax the contract allows (control characters, such as a newline, it refuses: see below).
const NASTY_DIR = '/tmp/it\'s a $(touch pwned) `id` \\ "dir"; line two/bootstrap';
// URL characters only (no whitespace, quotes or braces), still shell syntax: ' $( ) ; & *
const NASTY_URL = "http://127.0.0.1:1/a'b/$(touch;pwned)/&id;*/x";

function nastyOptions(overrides: Partial<StubOptions> = {}): StubOptions {
  return { baseUrl: NASTY_URL, bootstrapDir: NASTY_DIR, bootstrapUser: "ubuntu", token: EXAMPLE_TOKEN, ...overrides };
}

function writeScript(name: string, text: string): string {
  const path = join(work, name);
  writeFileSync(path, text);
  return path;
}

describe("renderStub text", () => {
  it("passes shellcheck --shell=sh", () => {
    expect(existsSync(SHELLCHECK), `${SHELLCHECK} is missing: run bash scripts/python-venv.sh`).toBe(true);
    for (const [name, text] of [
      ["example.sh", exampleStub()],
      ["nasty.sh", renderStub(nastyOptions())],
      ["no-token-no-user.sh", renderStub(nastyOptions({ token: null, bootstrapUser: null }))],
    ] as const) {
      const r = spawnSync(SHELLCHECK, ["--shell=sh", "--severity=style", writeScript(name, text)], { encoding: "utf8" });
      expect(r.stdout + r.stderr, name).toBe("");
      expect(r.status, name).toBe(0);
    }
  });

  it.each(["sh", "bash"])("parses with %s -n", (shell) => {
    for (const text of [exampleStub(), renderStub(nastyOptions()), renderStub(nastyOptions({ token: null }))]) {
      const r = spawnSync(shell, ["-n", writeScript(`parse-${shell}.sh`, text)], { encoding: "utf8" });
      expect(r.stderr).toBe("");
      expect(r.status).toBe(0);
    }
  });

  it('is functions only: set -u first, main "$@" || exit 1 as the last line', () => {
    const lines = exampleStub().trimEnd().split("\n");
    expect(lines[0]).toBe("#!/bin/sh");
    expect(lines.find((l) => !l.startsWith("#"))).toBe("set -u");
    expect(lines.at(-1)).toBe('main "$@" || exit 1');
    // Outside function bodies there is nothing but comments, blank lines, set -u and the main call.
    let depth = 0;
    const topLevel: string[] = [];
    for (const line of lines) {
      if (/^[a-z_][a-z0-9_]*\(\) \{$/.test(line)) depth += 1;
      else if (line === "}") depth -= 1;
      else if (depth === 0 && line.trim() !== "" && !line.startsWith("#")) topLevel.push(line);
    }
    expect(topLevel).toEqual(["set -u", 'main "$@" || exit 1']);
  });

  it("is stub/stub.sh with only its settings block replaced; the asset itself passes shellcheck and sh -n", () => {
    const asset = readFileSync(STUB_SH_PATH, "utf8");
    const outside = (text: string) => text.replace(/^# >>> settings[\s\S]*?^# <<< settings$/m, "<settings>");
    for (const text of [exampleStub(), renderStub(nastyOptions({ token: null }))]) {
      expect(outside(text)).toBe(outside(asset));
      expect(outside(text)).toContain("<settings>");
    }
    const lint = spawnSync(SHELLCHECK, ["--shell=sh", "--severity=style", STUB_SH_PATH], { encoding: "utf8" });
    expect(lint.stdout + lint.stderr).toBe("");
    expect(lint.status).toBe(0);
    expect(spawnSync("sh", ["-n", STUB_SH_PATH]).status).toBe(0);
  });

  it("stubOptionsFor takes dir, user and (by default) the base URL from the config", () => {
    const config = buildBootstrapConfig(exampleHostFacts());
    expect(stubOptionsFor(config, { token: EXAMPLE_TOKEN })).toEqual({
      baseUrl: config.hub.url,
      bootstrapDir: "/home/ubuntu/cocalc-host/bootstrap",
      bootstrapUser: "ubuntu",
      token: EXAMPLE_TOKEN,
    });
    expect(stubOptionsFor(config, { baseUrl: "http://other:1/x" }).baseUrl).toBe("http://other:1/x");
    expect(stubOptionsFor(config).token).toBeNull();
  });

  it("embeds the package's bootstrap.py sha256 by default, and the curl flags", () => {
    const text = exampleStub();
    expect(text).toContain(`bootstrap_py_sha256=${bootstrapPySha256()}`);
    for (const flag of [
      "--location",
      "--retry-connrefused",
      "--write-out '%{http_code}'",
      "--connect-timeout 10",
      '--max-time "$curl_max_time"',
      '--retry "$curl_retries"',
      "--config -",
    ]) {
      expect(text).toContain(flag);
    }
    expect(text).not.toContain("set -x");
    expect(text).not.toContain("--retry-all-errors"); // the exchange (a POST) is never sent again after an answer
  });

  it("quotes every value: sh reads back exactly what was rendered, and runs none of it", () => {
    const text = renderStub(nastyOptions({ bootstrapUser: "o_neil-2" }));
    // Run the stub's settings() only (drop the main call) and print the values.
    const probe = `${text.replace(/main "\$@" \|\| exit 1\n$/, "")}settings\nprintf '%s\\0' "$base_url" "$bootstrap_dir" "$default_user" "$token_file" "$config_file"\n`;
    const dir = mkdtempSync(join(work, "cwd-"));
    const out = execFileSync("sh", [writeScript("probe.sh", probe)], { cwd: dir, encoding: "utf8" });
    expect(out.split("\0").slice(0, -1)).toEqual([NASTY_URL, NASTY_DIR, "o_neil-2", `${NASTY_DIR}/bootstrap-token`, `${NASTY_DIR}/bootstrap-config.json`]);
    expect(existsSync(join(dir, "pwned"))).toBe(false);
  });

  it("writes the token only through a quoted here-document, not as an argument", () => {
    const text = exampleStub();
    const tokenLines = text.split("\n").filter((l) => l.includes(EXAMPLE_TOKEN));
    expect(tokenLines).toEqual([EXAMPLE_TOKEN]); // alone on its here-document line
    expect(text).toContain("<<'COCALC_BOOTSTRAP_TOKEN_END'");
    const withoutToken = renderStub(nastyOptions({ token: null }));
    expect(withoutToken).not.toContain("COCALC_BOOTSTRAP_TOKEN_END");
    expect(withoutToken).toContain("no bootstrap token");
  });

  it("refuses a control character in the bootstrap dir (the contract's rule, before any quoting)", () => {
    for (const bootstrapDir of ["/tmp/a\nb/bootstrap", "/tmp/a\rb", "/tmp/a\u2028b", "/tmp/\ud800"]) {
      expect(() => renderStub(nastyOptions({ bootstrapDir })), JSON.stringify(bootstrapDir)).toThrow(/bootstrapDir/);
    }
  });

  it("rejects bad options, naming each one", () => {
    let error: unknown;
    try {
      renderStub({
        baseUrl: "ftp://hub/x",
        bootstrapDir: "relative/dir",
        bootstrapUser: "root",
        token: "has space and 'quote'",
        bootstrapPySha256: "ABC",
        downloadMaxTimeS: 0,
        downloadRetries: -1,
      });
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(BootstrapConfigError);
    const message = (error as Error).message;
    for (const path of ["baseUrl", "bootstrapDir", "bootstrapUser", "token", "bootstrapPySha256", "downloadMaxTimeS", "downloadRetries"]) {
      expect(message).toContain(`$.${path}:`);
    }
    expect(message).not.toContain("has space"); // a bad token is not echoed back
  });

  it("a truncated stub runs nothing (no directory made)", () => {
    const dir = join(work, "truncated-target", "bootstrap");
    const text = renderStub({ baseUrl: "http://127.0.0.1:1/x", bootstrapDir: dir, bootstrapUser: "nobody", token: EXAMPLE_TOKEN, downloadRetries: 0 });
    const lastLine = text.lastIndexOf('main "$@"');
    const cuts = Array.from({ length: 40 }, (_, i) => Math.floor((lastLine * i) / 40));
    cuts.push(lastLine);
    for (const cut of cuts) {
      spawnSync("sh", [writeScript("truncated.sh", text.slice(0, cut))], { encoding: "utf8", cwd: work, timeout: 10_000 });
      expect(existsSync(join(work, "truncated-target")), `cut at ${cut}`).toBe(false);
    }
  });
});

describe("the stub's bytecode loader (run_python), run on its own", () => {
  const text = readFileSync(STUB_SH_PATH, "utf8");
  const m = /\n {2}python3 -c '\n([\s\S]*?)\n' "\$script" "\$sha" "\$@"\n/.exec(text);
  const loader = m?.[1] ?? "";
  const dir = mkdtempSync(join(tmpdir(), "stub-loader-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const sha256 = (b: Buffer | string) => createHash("sha256").update(b).digest("hex");

  function load(script: string, sha: string, ...args: string[]) {
    return spawnSync("python3", ["-c", loader, script, sha, ...args], { encoding: "utf8", cwd: dir });
  }

  it("is found in stub.sh", () => {
    expect(loader).toMatch(/^def load\(\):/);
  });

  it("refuses bytes that do not have the verified sha256 (changed after the stub checked them): nothing runs", () => {
    const own = mkdtempSync(join(dir, "refused-"));
    const py = join(own, "bootstrap.py");
    const marker = join(own, "ran");
    writeFileSync(py, `open(${JSON.stringify(marker)}, "w").close()\n`);
    const r = load(py, sha256("something else"));
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/is not the verified one \(sha256 [0-9a-f]{64}\); not running it/);
    expect(existsSync(marker)).toBe(false);
    expect(existsSync(join(own, ".bytecode"))).toBe(false);
  });

  it("runs verified bytes as the script, with its arguments and exit code; a traceback names the file", () => {
    const py = join(dir, "bootstrap.py");
    const src = 'import sys\nprint(__name__, __file__, sys.argv)\nif "boom" in sys.argv:\n    raise RuntimeError("boom")\nsys.exit(7)\n';
    writeFileSync(py, src);
    const r = load(py, sha256(src), "--config", "c.json");
    expect(r.status).toBe(7);
    expect(r.stdout.trim()).toBe(`__main__ ${py} ['${py}', '--config', 'c.json']`);
    const boom = load(py, sha256(src), "boom");
    expect(boom.status).toBe(1);
    expect(boom.stderr).toContain(`File "${py}", line 4`);
  });
});
