import { BootstrapConfigSchema, bootstrapPySha256 } from "@cocalc/project-host-bootstrap";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { type Db, openPglite } from "../cloud/bootstrap/db.js";
import { assembleHostConfig, provisionHost } from "../cloud/bootstrap/hosts.js";
import { ManifestFetcher, versionFromUrl } from "../cloud/bootstrap/manifests.js";
import { migrate } from "../cloud/bootstrap/migrate.js";
import { getHost, getSecret, listHostTokens } from "../cloud/bootstrap/store.js";
import { hostRecord, siteSettings } from "./support/fixtures.js";
import { goodManifest, type ManifestServer, manifestPath, serveGoodManifests, startManifestServer } from "./support/manifest-server.js";

let srv: ManifestServer;
beforeAll(async () => {
  srv = await startManifestServer();
});
afterAll(async () => srv.close());
beforeEach(() => {
  srv.files.clear();
  srv.hits.clear();
  serveGoodManifests(srv);
  serveGoodManifests(srv, "arm64");
});

// Generous: a loaded 2-core CI machine can take seconds to answer on loopback.
const fetcher = (timeoutMs = 10_000) => new ManifestFetcher({ timeoutMs, ttlMs: 60_000 });

describe("host config assembly from manifests", () => {
  it("builds a valid config from good manifests", async () => {
    const record = hostRecord({ data_disk_candidates: ["/dev/disk/by-id/data"] });
    const { config } = await assembleHostConfig(record, siteSettings(srv.baseUrl), fetcher());
    expect(BootstrapConfigSchema.parse(config)).toEqual(config);
    expect(config.host.id).toBe(record.id);
    expect(config.arch).toBe("amd64");
    expect(config.artifacts.project_host).toMatchObject({ version: "1.2.3", sha256: "ab".repeat(32), size_bytes: 1234567 });
    expect(config.artifacts.tools.url).toBe(`${srv.baseUrl}/tools/1.2.3/tools-linux-amd64.tar.xz`);
    expect(config.hub.url).toBe(`http://127.0.0.1:9/bootstrap/hosts/${record.id}`);
    expect(config.hub.events_url).toBe(`${config.hub.url}/events`);
    expect(config.service.health_url).toBe("http://127.0.0.1:9002/healthz");
    expect(config.btrfs.data_disk?.candidates).toEqual(["/dev/disk/by-id/data"]);
    expect(config.secrets).toEqual(["conat-password"]);
    expect(config.daemon.region).toBe("us-west1"); // PROJECT_HOST_REGION in the env file
    expect(config.daemon.software_base_url).not.toBeNull();
    expect(config.cloudflared).toBeNull(); // no tunnel host name in the record
  });

  it("selects the manifests of the host's arch", async () => {
    const { config } = await assembleHostConfig(hostRecord({ arch: "arm64" }), siteSettings(srv.baseUrl), fetcher());
    expect(config.arch).toBe("arm64");
    expect(config.artifacts.project.url).toContain("linux-arm64");
    expect(srv.hits.get(manifestPath("project", "arm64"))).toBe(1);
  });

  it("takes the version from the URL when the manifest has none", async () => {
    srv.files.set(manifestPath("project"), {
      body: JSON.stringify(goodManifest(srv.baseUrl, "project", "amd64", { version: "2025.06.01-rc1", versionInUrlOnly: true })),
    });
    const { config } = await assembleHostConfig(hostRecord(), siteSettings(srv.baseUrl), fetcher());
    expect(config.artifacts.project.version).toBe("2025.06.01-rc1");
    expect(versionFromUrl("https://x/software/project-host/1.0/a.tar.xz", "project_host")).toBe("1.0");
    expect(versionFromUrl("https://x/software/project-host/a.tar.xz", "project_host")).toBeNull();
  });

  it("refuses a manifest without any version, naming it", async () => {
    const m = goodManifest(srv.baseUrl, "tools", "amd64", { versionInUrlOnly: true });
    m.url = `${srv.baseUrl}/tools-latest.tar.xz`;
    srv.files.set(manifestPath("tools"), { body: JSON.stringify(m) });
    await expect(assembleHostConfig(hostRecord(), siteSettings(srv.baseUrl), fetcher())).rejects.toThrow(
      `${srv.baseUrl}/tools/latest-linux-amd64.json: has no version field`,
    );
  });

  it("refuses a manifest for another arch, naming it", async () => {
    srv.files.set(manifestPath("project-host"), { body: JSON.stringify(goodManifest(srv.baseUrl, "project-host", "arm64")) });
    const err = await assembleHostConfig(hostRecord(), siteSettings(srv.baseUrl), fetcher()).catch((e: Error) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toContain(`artifact manifest ${srv.baseUrl}/project-host/latest-linux-amd64.json: is for arch "arm64", not "amd64"`);
  });

  it("passes a manifest's image beside the archive; bundle_images: false leaves it out; a bad image is refused", async () => {
    const image = { url: `${srv.baseUrl}/project/1.2.3/project-linux-amd64.sqfs`, sha256: ` ${"CD".repeat(32)}`, size_bytes: 4096 };
    srv.files.set(manifestPath("project"), { body: JSON.stringify({ ...goodManifest(srv.baseUrl, "project", "amd64"), image }) });
    const { config } = await assembleHostConfig(hostRecord(), siteSettings(srv.baseUrl), fetcher());
    expect(config.artifacts.project.image).toEqual({ url: image.url, sha256: "cd".repeat(32), size_bytes: 4096 });
    expect(config.artifacts.project.url).toMatch(/\.tar\.xz$/); // the archive stays: the host falls back to it
    expect(config.artifacts.tools.image).toBeNull();
    const off = await assembleHostConfig(hostRecord(), { ...siteSettings(srv.baseUrl), bundle_images: false }, fetcher());
    expect(off.config.artifacts.project.image).toBeNull();
    srv.files.set(manifestPath("project"), { body: JSON.stringify({ ...goodManifest(srv.baseUrl, "project", "amd64"), image: { ...image, sha256: "nope" } }) });
    await expect(assembleHostConfig(hostRecord(), siteSettings(srv.baseUrl), fetcher())).rejects.toThrow(
      /project\/latest-linux-amd64\.json: image\.sha256 is not a sha256/,
    );
  });

  it("passes a zstd archive (.tar.zst) through as the bundle's url", async () => {
    const url = `${srv.baseUrl}/project/1.2.3/project-linux-amd64.tar.zst`;
    srv.files.set(manifestPath("project"), { body: JSON.stringify({ ...goodManifest(srv.baseUrl, "project", "amd64"), url }) });
    const { config } = await assembleHostConfig(hostRecord(), siteSettings(srv.baseUrl), fetcher());
    expect(BootstrapConfigSchema.parse(config)).toEqual(config);
    expect(config.artifacts.project).toMatchObject({ url, version: "1.2.3" });
    expect(config.artifacts.tools.url).toMatch(/\.tar\.xz$/);
  });

  it("refuses a manifest without a checksum", async () => {
    const m = goodManifest(srv.baseUrl, "project", "amd64");
    delete m.sha256;
    srv.files.set(manifestPath("project"), { body: JSON.stringify(m) });
    await expect(assembleHostConfig(hostRecord(), siteSettings(srv.baseUrl), fetcher())).rejects.toThrow(
      /project\/latest-linux-amd64\.json: sha256 missing: a manifest without a sha256 is never installed/,
    );
  });

  it("refuses a checksum that is not a sha256", async () => {
    srv.files.set(manifestPath("project"), { body: JSON.stringify(goodManifest(srv.baseUrl, "project", "amd64", { sha256: "deadbeef" })) });
    await expect(assembleHostConfig(hostRecord(), siteSettings(srv.baseUrl), fetcher())).rejects.toThrow(/sha256 is not a sha256/);
  });

  it("refuses a malformed body and reports every bad manifest at once", async () => {
    srv.files.set(manifestPath("tools"), { body: "{not json" });
    srv.files.set(manifestPath("project"), { body: JSON.stringify({ url: "ftp://x", size_bytes: -1 }) });
    const err = (await assembleHostConfig(hostRecord(), siteSettings(srv.baseUrl), fetcher()).catch((e: Error) => e)) as Error;
    expect(err.message).toContain(`${srv.baseUrl}/tools/latest-linux-amd64.json: is not valid JSON`);
    expect(err.message).toMatch(/project\/latest-linux-amd64\.json: url must be an http:\/\/ or https:\/\/ URL/);
  });

  it("refuses an HTTP error", async () => {
    srv.files.delete(manifestPath("tools"));
    await expect(assembleHostConfig(hostRecord(), siteSettings(srv.baseUrl), fetcher())).rejects.toThrow(/tools\/latest-linux-amd64\.json: HTTP 404/);
  });

  it("gives up on a slow server after the timeout", async () => {
    const body = JSON.stringify(goodManifest(srv.baseUrl, "project-host"));
    srv.files.set(manifestPath("project-host"), { body, delayMs: 3000 });
    const t0 = Date.now();
    await expect(assembleHostConfig(hostRecord(), siteSettings(srv.baseUrl), fetcher(500))).rejects.toThrow(
      /project-host\/latest-linux-amd64\.json: no answer within 500 ms/,
    );
    expect(Date.now() - t0).toBeLessThan(2500);
  });

  it("caches good manifests briefly, and never failures", async () => {
    let clock = 0;
    const f = new ManifestFetcher({ ttlMs: 1000, now: () => clock });
    const settings = siteSettings(srv.baseUrl);
    await assembleHostConfig(hostRecord(), settings, f);
    await assembleHostConfig(hostRecord(), settings, f);
    expect(srv.hits.get(manifestPath("tools"))).toBe(1);
    clock = 1001;
    await assembleHostConfig(hostRecord(), settings, f);
    expect(srv.hits.get(manifestPath("tools"))).toBe(2);
    srv.files.set(manifestPath("tools"), { body: "oops" });
    clock = 3000;
    await expect(assembleHostConfig(hostRecord(), settings, f)).rejects.toThrow();
    serveGoodManifests(srv);
    await assembleHostConfig(hostRecord(), settings, f);
    expect(srv.hits.get(manifestPath("tools"))).toBe(4);
  });

  it("refuses a bad host record, naming the field", async () => {
    await expect(assembleHostConfig(hostRecord({ runtime_user: "root" }), siteSettings(srv.baseUrl), fetcher())).rejects.toThrow(/runtime_user/);
  });
});

describe("provisionHost", () => {
  let db: Db;
  beforeAll(async () => {
    db = await openPglite();
    await migrate(db);
  });
  afterAll(async () => db.close());

  it("stores the config and secrets, issues a token and renders the stub", async () => {
    const record = hostRecord();
    const deps = { db, settings: siteSettings(srv.baseUrl), manifests: fetcher() };
    const host = await provisionHost(deps, record, { secrets: { "conat-password": "pw-123456" } });
    expect(host.baseUrl).toBe(`http://127.0.0.1:9/bootstrap/hosts/${record.id}`);
    expect(host.stub.startsWith("#!/bin/sh")).toBe(true);
    expect(host.stub).toContain(host.baseUrl);
    expect(host.stub).toContain(bootstrapPySha256());
    expect(host.stub).toContain(host.token);
    expect((await getHost(db, record.id))?.config).toEqual(host.config);
    expect(await getSecret(db, record.id, "conat-password")).toBe("pw-123456");
    expect(await listHostTokens(db, record.id)).toHaveLength(1);
    await expect(provisionHost(deps, hostRecord(), {})).rejects.toThrow(/no value for secret\(s\) conat-password/);
  });
});
