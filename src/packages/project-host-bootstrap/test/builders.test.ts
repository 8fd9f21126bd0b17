import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { exampleHostFacts } from "../scripts/example-host.js";
import { BOOTSTRAP_PY_PATH } from "../src/asset.js";
import { BootstrapConfigError, bootstrapPaths, buildBootstrapConfig, defaultAptPackages, type HostFacts, imageSizeGb } from "../src/builders.js";
import { BootstrapConfigSchema, checkConfig } from "../src/config.js";

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === "object") {
    for (const v of Object.values(value)) deepFreeze(v);
    Object.freeze(value);
  }
  return value;
}

function errorOf(fn: () => unknown): BootstrapConfigError {
  try {
    fn();
  } catch (e) {
    if (e instanceof BootstrapConfigError) return e;
    throw e;
  }
  throw new Error("expected a BootstrapConfigError");
}

describe("buildBootstrapConfig", () => {
  it("derives paths, image size, packages and OS, and applies the schema's defaults", () => {
    const config = buildBootstrapConfig(exampleHostFacts());
    expect(config).toMatchObject({
      schema_version: 1,
      bootstrap_user: "ubuntu",
      home: "/home/ubuntu",
      bootstrap_root: "/home/ubuntu/cocalc-host",
      bootstrap_dir: "/home/ubuntu/cocalc-host/bootstrap",
      os: { id: "ubuntu", min_version: "24.04" },
      parallel: true,
      tunnel: null,
      env: {},
      btrfs: { mount_point: "/btrfs", image_path: "/home/ubuntu/cocalc-host/btrfs.img", image_size_gb: 90, data_disk: null },
      apt: { packages: [...defaultAptPackages], lists_max_age_s: 3600, lock_timeout_s: 600 },
      service: { unit: "cocalc-project-host", health_timeout_s: 120 },
    });
    expect(config.artifacts.project).toEqual({
      url: "https://example.invalid/software/project/1.4.2/project-linux-amd64.tar.xz",
      sha256: null,
      version: "1.4.2",
      size_bytes: null,
      strip_components: 0,
      expected_files: [],
      executables: [],
      image: null,
    });
    expect(checkConfig(config)).toEqual({ ok: true, config });
  });

  it("uses the given home for every derived path", () => {
    const config = buildBootstrapConfig({ ...exampleHostFacts(), bootstrap_user: "cocalc", home: "/srv/cocalc" });
    expect([config.home, config.bootstrap_root, config.bootstrap_dir, config.btrfs.image_path]).toEqual([
      "/srv/cocalc",
      "/srv/cocalc/cocalc-host",
      "/srv/cocalc/cocalc-host/bootstrap",
      "/srv/cocalc/cocalc-host/btrfs.img",
    ]);
    expect(bootstrapPaths("cocalc", "/srv/cocalc").token_file).toBe("/srv/cocalc/cocalc-host/bootstrap/bootstrap-token");
  });

  it("keeps what the facts give over what it would derive", () => {
    const facts: HostFacts = {
      ...exampleHostFacts(),
      os: { id: "debian", min_version: "12" },
      apt: { packages: ["curl"], lock_timeout_s: 30 },
      btrfs: { image_size_gb: 7, data_disk: { candidates: ["/dev/disk/by-id/nvme-data"], min_size_gb: 50 } },
      tunnel: { host: "connector.example.com", user: "tunnel", remote_port: 20022, local_port: 22 },
      parallel: false,
      env: { COCALC_EXTRA: "1" },
    };
    const config = buildBootstrapConfig(facts);
    expect(config.os).toEqual({ id: "debian", min_version: "12" });
    expect(config.apt).toEqual({ packages: ["curl"], lists_max_age_s: 3600, lock_timeout_s: 30 });
    expect(config.btrfs.image_size_gb).toBe(7);
    expect(config.btrfs.data_disk).toEqual({ candidates: ["/dev/disk/by-id/nvme-data"], min_size_gb: 50, wait_s: 600 });
    expect(config.tunnel).toEqual({ host: "connector.example.com", port: 22, user: "tunnel", remote_port: 20022, local_port: 22 });
    expect(config.parallel).toBe(false);
    expect(config.env).toEqual({ COCALC_EXTRA: "1" });
  });

  it("never mutates its (deep-frozen) argument and shares nothing with it", () => {
    const facts = deepFreeze(exampleHostFacts());
    const snapshot = JSON.stringify(facts);
    const config = buildBootstrapConfig(facts);
    expect(JSON.stringify(facts)).toBe(snapshot);
    config.artifacts.project_host.expected_files.push("changed");
    config.conat_urls.push("http://other/");
    expect(JSON.stringify(facts)).toBe(snapshot);
    expect(config.host).not.toBe(facts.host);
  });

  it("returns a config that survives a JSON round trip unchanged", () => {
    const config = buildBootstrapConfig(exampleHostFacts());
    expect(BootstrapConfigSchema.parse(JSON.parse(JSON.stringify(config)))).toEqual(config);
  });

  it("names every bad field path, with the offending value, in one error", () => {
    const facts = exampleHostFacts();
    const error = errorOf(() =>
      buildBootstrapConfig({
        ...facts,
        bootstrap_user: "root",
        arch: "riscv64" as HostFacts["arch"],
        artifacts: { ...facts.artifacts, tools: { ...facts.artifacts.tools, sha256: "not-a-sha" } },
        conat_urls: ["ftp://conat"],
      }),
    );
    const paths = error.issues.map((i) => i.path.join("."));
    expect(paths).toEqual(expect.arrayContaining(["bootstrap_user", "arch", "artifacts.tools.sha256", "conat_urls.0"]));
    expect(error.message).toContain('$.artifacts.tools.sha256: must be 64 lowercase hex digits (a sha256) (got "not-a-sha")');
    expect(error.message).toContain("$.bootstrap_user: must not be root");
    expect(error.message).toContain("$.conat_urls[0]:");
    expect(error.message).toContain("$.arch:");
    expect(error.message).toMatch(/^invalid bootstrap config \(\d+ problems\):/);
  });

  it("reports unknown keys at their path", () => {
    const facts = exampleHostFacts();
    const tools = { ...facts.artifacts.tools, checksum: "x" } as HostFacts["artifacts"]["tools"];
    const error = errorOf(() => buildBootstrapConfig({ ...facts, artifacts: { ...facts.artifacts, tools } }));
    expect(error.message).toContain("$.artifacts.tools:");
    expect(error.message).toContain("checksum");
  });

  it.each([0, -5, Number.NaN, Number.POSITIVE_INFINITY])("rejects disk_size_gb %s as a host fact", (disk) => {
    const error = errorOf(() => buildBootstrapConfig({ ...exampleHostFacts(), disk_size_gb: disk }));
    expect(error.message).toMatch(/^invalid host facts/);
    expect(error.message).toContain("$.disk_size_gb: host fact must be a positive number of GB");
  });

  it("builds configs that bootstrap.py's check-config accepts too", () => {
    const dir = mkdtempSync(join(tmpdir(), "phb-builders-"));
    try {
      const path = join(dir, "config.json");
      writeFileSync(path, JSON.stringify(buildBootstrapConfig(exampleHostFacts())));
      const r = spawnSync("python3", [BOOTSTRAP_PY_PATH, "--config", path, "check-config"], { encoding: "utf8" });
      expect(r.stdout + r.stderr).toContain("valid");
      expect(r.status, r.stderr).toBe(0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("imageSizeGb", () => {
  it.each([
    [1000, 900],
    [200, 180],
    [100, 90],
    [50, 40],
    [20, 10],
    [11, 1],
    [10, 1],
    [1, 1],
    [100.7, 90],
  ])("a %s GB disk gets a %s GB image", (disk, image) => {
    expect(imageSizeGb(disk)).toBe(image);
  });
});
