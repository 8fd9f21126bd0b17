/**
 * Test artifacts, built by the tests themselves and cached by their inputs:
 *
 * - the three bundles in the real bundles' names and layouts (UPSTREAM.md
 *   "Bundles and manifests", `bundleLayout`): project-host is
 *   `./cocalc-project-host-<v>-<arch>-linux/` with the single executable
 *   `cocalc-project-host` (here a small real daemon in python3, with a health
 *   endpoint, that holds the host to the daemon's contract) and its `node`
 *   link, unpacked with strip 2; project is `bundle/` (index.js,
 *   package.json, node_modules/, build/, src/packages/project/bin/), strip 1;
 *   tools is `bin/` (stand-ins for dropbear, rg, rustic, sshpiperd), strip 1.
 *   Every bundle can be padded with code-like text so it compresses like real
 *   software (inside the executables for project-host and tools, which are
 *   single files upstream; under node_modules/ for project);
 * - a Node.js dist mirror in the official layout
 *   (`v<version>/node-v<version>-linux-<arch>.tar.xz` + `SHASUMS256.txt`),
 *   made from the `node-linux-<arch>` npm package (the official `bin/node`)
 *   plus npm under `lib/node_modules/npm`.
 *
 * - each bundle's squashfs image (`buildBundleImage`), made from its archive by
 *   the workspace's converter (project-host-bootstrap/python/bundle_image.py).
 *
 * `publishSite` lays them out for the artifact server with the hub's
 * manifests (`<artifact>/latest-linux-<arch>.json`, with an `image` entry
 * when images are published) and `.sha256` files.
 */
import { createHash } from "node:crypto";
import { chmodSync, createReadStream, existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Arch } from "@cocalc/project-host-bootstrap";
import { cacheDir } from "./paths.js";
import { Prng } from "./prng.js";
import { run } from "./proc.js";

/** Bump when the layout or content recipe changes. */
const RECIPE_VERSION = 1;
/** Bump when a bundle's layout changes (2: the real bundles' names and layouts). */
const BUNDLE_LAYOUT_VERSION = 2;
/** Fixed mtime for reproducible tarballs (2024-01-01). */
const MTIME = "@1704067200";

export const BUNDLES = ["project_host", "project", "tools"] as const;
export type BundleName = (typeof BUNDLES)[number];

export interface BundleSpec {
  artifact: BundleName;
  version: string;
  /** Approximate uncompressed size of the padding (code-like text), bytes. */
  paddingBytes: number;
  /** xz preset; 6 is xz's default and what release tarballs use. */
  xzLevel?: number;
  /** project_host only: a daemon that starts and listens but answers /healthz with 503 (the rollback tests). */
  unhealthy?: boolean;
  /** `.tar.xz` (the default) or `.tar.zst` (zstd -19: as small as xz -6, far cheaper to decompress). */
  compression?: Compression;
  /** zstd level when compression is zstd (default 19). */
  zstdLevel?: number;
}

/** How a bundle archive is compressed: `.tar.xz` or `.tar.zst`. */
export type Compression = "xz" | "zstd";

/** The archive's file-name suffix for a compression (xz when absent). */
export function archiveSuffix(compression: Compression = "xz"): ".tar.xz" | ".tar.zst" {
  return compression === "zstd" ? ".tar.zst" : ".tar.xz";
}

/** A bundle archive's name with its compression suffix replaced (e.g. by `.sqfs`). */
function withoutArchiveSuffix(name: string, replacement: string): string {
  return name.replace(/\.tar\.(xz|zst)$/, replacement);
}

export interface BuiltFile {
  /** Absolute path in the cache. */
  path: string;
  sha256: string;
  size_bytes: number;
}

export interface BuiltBundle extends BuiltFile {
  spec: BundleSpec;
  fileName: string;
  /** What the tarball holds at its top (strip_components removes it). */
  topDir: string;
  stripComponents: number;
  expectedFiles: string[];
  executables: string[];
}

/** The project-host bundle's executable (upstream's Node SEA), at the bundle root. */
export const PROJECT_HOST_EXEC = "cocalc-project-host";
/** The tools bundle's stand-ins for upstream's binaries in its `bin/`. */
export const TOOL_NAMES = ["dropbear", "rg", "rustic", "sshpiperd"] as const;
/** The project bundle's entry points (stand-ins). */
const PROJECT_BIN = "src/packages/project/bin/cocalc-project";

export interface BundleLayout {
  /** Published as `<artifact dir>/<version>/<fileName>` (UPSTREAM.md's URL keys). */
  fileName: string;
  /** The tarball's top member (tar -C staging -cf - <top>). */
  top: string;
  strip_components: number;
  expected_files: string[];
  executables: string[];
}

/**
 * The real bundles' names and inner layouts (UPSTREAM.md "Bundles and manifests"); the one place an archive's file
 * name is computed (`compression` picks its suffix).
 */
export function bundleLayout(artifact: BundleName, version: string, arch: Arch = "amd64", compression: Compression = "xz"): BundleLayout {
  const suffix = archiveSuffix(compression);
  switch (artifact) {
    case "project_host": {
      // `tar Jcf <dir>.tar.xz ./<dir>`: the "./" is a component, hence strip 2
      const dir = `cocalc-project-host-${version}-${arch}-linux`;
      return {
        fileName: `${dir}${suffix}`,
        top: `./${dir}`,
        strip_components: 2,
        expected_files: [PROJECT_HOST_EXEC, "node"],
        executables: [PROJECT_HOST_EXEC],
      };
    }
    case "project":
      return {
        fileName: `bundle-linux-${arch}${suffix}`,
        top: "bundle",
        strip_components: 1,
        expected_files: ["index.js", "package.json"],
        executables: [PROJECT_BIN],
      };
    case "tools":
      return { fileName: `tools-linux-${arch}${suffix}`, top: "bin", strip_components: 1, expected_files: [...TOOL_NAMES], executables: [...TOOL_NAMES] };
  }
}

export interface NodeMirrorSpec {
  version: string;
  npmVersion: string;
  /** Node's arch naming: x64 or arm64. */
  arch?: "x64" | "arm64";
  xzLevel?: number;
}

export interface BuiltNode extends BuiltFile {
  spec: Required<NodeMirrorSpec>;
  fileName: string;
  /** Cache directory holding `v<version>/` (tarball + SHASUMS256.txt). */
  mirrorDir: string;
}

export const DEFAULT_NODE: Required<NodeMirrorSpec> = { version: "20.20.2", npmVersion: "10.8.2", arch: "x64", xzLevel: 6 };

/** Node's name for a Debian arch: its dist tarballs are `node-v<ver>-linux-<x64|arm64>.tar.xz`. */
export function nodeArchOf(arch: Arch): "x64" | "arm64" {
  return arch === "amd64" ? "x64" : "arm64";
}

const DAEMON_SOURCE = fileURLToPath(new URL("../src/daemon.py", import.meta.url));
const IMAGE_CONVERTER = fileURLToPath(new URL("../../project-host-bootstrap/python/bundle_image.py", import.meta.url));

export function dashName(artifact: BundleName): string {
  return artifact.replace(/_/g, "-");
}

function keyOf(value: unknown): string {
  return createHash("sha256").update(JSON.stringify({ RECIPE_VERSION, value })).digest("hex").slice(0, 16);
}

export async function sha256File(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

async function builtFile(path: string): Promise<BuiltFile> {
  const metaPath = `${path}.meta.json`;
  if (existsSync(metaPath)) return JSON.parse(readFileSync(metaPath, "utf8")) as BuiltFile;
  const meta: BuiltFile = { path, sha256: await sha256File(path), size_bytes: statSync(path).size };
  writeFileSync(`${metaPath}.${process.pid}`, JSON.stringify(meta));
  renameSync(`${metaPath}.${process.pid}`, metaPath);
  return meta;
}

// --- bundles -------------------------------------------------------------------

export async function buildBundle(spec: BundleSpec, log: (line: string) => void = () => {}): Promise<BuiltBundle> {
  const daemon = spec.artifact === "project_host" ? readFileSync(DAEMON_SOURCE, "utf8") : "";
  const key = keyOf({ spec, daemon, layout: BUNDLE_LAYOUT_VERSION });
  const name = dashName(spec.artifact);
  const layout = bundleLayout(spec.artifact, spec.version, "amd64", spec.compression);
  const fileName = layout.fileName;
  const dir = join(cacheDir(), "artifacts", name, `${spec.version}-${key}`);
  const path = join(dir, fileName);
  if (!existsSync(path)) {
    log(`building ${fileName} (${(spec.paddingBytes / 1e6).toFixed(0)} MB of padding)`);
    const staging = join(dir, `staging-${process.pid}`);
    rmSync(staging, { recursive: true, force: true });
    const top = join(staging, layout.top);
    mkdirSync(top, { recursive: true });
    const seed = `${spec.artifact}-${spec.version}`;
    const writeExe = (rel: string, text: string) => {
      mkdirSync(dirname(join(top, rel)), { recursive: true });
      writeFileSync(join(top, rel), text);
      chmodSync(join(top, rel), 0o755);
    };
    if (spec.artifact === "project_host") {
      // one file, as upstream's SEA: the daemon, its padding as trailing comments; `node` links to it
      writeExe(
        PROJECT_HOST_EXEC,
        `${daemon.replace("@VERSION@", spec.version).replace("@HEALTH@", spec.unhealthy ? "fail" : "ok")}\n${commentPadding(spec.paddingBytes, seed)}`,
      );
      symlinkSync(PROJECT_HOST_EXEC, join(top, "node"));
    } else if (spec.artifact === "tools") {
      // single binaries upstream: each stand-in answers --version, its share of the padding after `exit`
      for (const tool of TOOL_NAMES) {
        const padding = commentPadding(spec.paddingBytes / TOOL_NAMES.length, `${seed}-${tool}`);
        writeExe(tool, `#!/bin/sh\n# stand-in for ${tool} (host-testbed)\necho "${tool} ${spec.version}"\nexit 0\n${padding}`);
      }
    } else {
      writeFileSync(join(top, "index.js"), `// stand-in for the project bundle's entry point (host-testbed)\nconsole.log("project ${spec.version}");\n`);
      writeFileSync(join(top, "package.json"), `${JSON.stringify({ name: "@cocalc/project", version: spec.version, main: "index.js" }, null, 2)}\n`);
      mkdirSync(join(top, "build"), { recursive: true });
      writeFileSync(join(top, "build", "VERSION"), `${spec.version}\n`);
      writeExe(PROJECT_BIN, `#!/bin/sh\nexec node "$(dirname "$0")/../../../../index.js" "$@"\n`);
      mkdirSync(join(top, "node_modules"), { recursive: true });
      writePadding(join(top, "node_modules"), spec.paddingBytes, seed);
    }
    if (spec.compression === "zstd") await packTar(staging, layout.top, path, ["zstd", "-T0", `-${spec.zstdLevel ?? 19}`, "-q", "-c"]);
    else await packTarXz(staging, layout.top, path, spec.xzLevel ?? 6);
    rmSync(staging, { recursive: true, force: true });
  }
  return {
    ...(await builtFile(path)),
    spec,
    fileName,
    topDir: layout.top,
    stripComponents: layout.strip_components,
    expectedFiles: layout.expected_files,
    executables: layout.executables,
  };
}

/** tar (reproducible: sorted, fixed owner and mtime) piped into multi-threaded xz. */
async function packTarXz(cwd: string, entry: string, out: string, level: number): Promise<void> {
  await packTar(cwd, entry, out, ["xz", "-T0", `-${level}`, "-c"]);
}

/** tar (reproducible: sorted, fixed owner and mtime) piped into a compressor (argv, writing to stdout). */
async function packTar(cwd: string, entry: string, out: string, compressor: string[]): Promise<void> {
  mkdirSync(dirname(out), { recursive: true });
  const part = `${out}.${process.pid}.part`; // unique: another process may build the same file
  await run(
    [
      "bash",
      "-c",
      // biome-ignore lint/suspicious/noTemplateCurlyInString: bash's own ${@:5} (the compressor's argv), not a template
      'set -o pipefail; tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="$4" -C "$1" -cf - "$2" | "${@:5}" > "$3"',
      "bash",
      cwd,
      entry,
      part,
      MTIME,
      ...compressor,
    ],
    { timeoutMs: 30 * 60_000 },
  );
  renameSync(part, out);
}

// --- bundle images ---------------------------------------------------------------

/**
 * The bundle's squashfs image, next to its archive in the cache (the converter is reproducible).
 * `level`: zstd level (the converter's default when absent; another level is cached as `.z<level>.sqfs`).
 */
export async function buildBundleImage(b: BuiltBundle, log: (line: string) => void = () => {}, level?: number): Promise<BuiltFile> {
  const suffix = level === undefined ? ".sqfs" : `.z${level}.sqfs`;
  const path = withoutArchiveSuffix(b.path, suffix);
  if (!existsSync(path)) {
    log(`building ${withoutArchiveSuffix(b.fileName, ".sqfs")}${level === undefined ? "" : ` (zstd level ${level})`}`);
    const part = `${path}.${process.pid}.tmp.sqfs`; // unique: another process may build the same file
    const levelArgs = level === undefined ? [] : ["--level", String(level)];
    await run(["python3", IMAGE_CONVERTER, b.path, part, "--strip", String(b.stripComponents), ...levelArgs], { timeoutMs: 60 * 60_000 });
    renameSync(part, path);
  }
  return builtFile(path);
}

// Code-like text: identifiers and keywords from a fixed vocabulary, so xz
// compresses it about as well as a tree of JavaScript (4-6x), not like zeros.
const KEYWORDS = ["const", "let", "return", "if", "else", "for", "function", "await", "async", "import", "export", "new", "this", "null", "true", "false"];
const SYLLABLES = [
  "ka",
  "lo",
  "mi",
  "ne",
  "ru",
  "sa",
  "to",
  "vi",
  "ze",
  "qu",
  "ba",
  "do",
  "fe",
  "gi",
  "ho",
  "ju",
  "pe",
  "ri",
  "su",
  "ty",
  "wa",
  "xo",
  "yu",
  "ce",
];

function vocabulary(rng: Prng, size: number): string[] {
  const words: string[] = [];
  for (let i = 0; i < size; i++) {
    const n = 2 + (rng.next() % 3);
    let w = "";
    for (let j = 0; j < n; j++) w += rng.pick(SYLLABLES);
    words.push(rng.next() % 4 === 0 ? `${w}_${rng.pick(SYLLABLES)}` : w);
  }
  return words;
}

function codeLine(rng: Prng, words: string[]): string {
  const indent = "  ".repeat(rng.next() % 4);
  switch (rng.next() % 5) {
    case 0:
      return `${indent}${rng.pick(KEYWORDS)} ${rng.pick(words)} = ${rng.pick(words)}(${rng.pick(words)}, ${rng.next() % 10000});`;
    case 1:
      return `${indent}if (${rng.pick(words)}.${rng.pick(words)} !== ${rng.pick(words)}) { ${rng.pick(words)}(); }`;
    case 2:
      return `${indent}// ${rng.pick(words)} ${rng.pick(words)} ${rng.pick(words)} ${rng.pick(words)}`;
    case 3:
      return `${indent}export function ${rng.pick(words)}(${rng.pick(words)}, ${rng.pick(words)}) {`;
    default:
      return `${indent}return ${rng.pick(words)}.${rng.pick(words)}[${rng.next() % 64}] + "${rng.pick(words)}";`;
  }
}

const PADDING_FILE_BYTES = 256 * 1024;

/** About `bytes` of code-like text as `#` comment lines (inside a script, after its code). */
function commentPadding(bytes: number, seed: string): string {
  if (bytes <= 0) return "";
  const rng = new Prng(seed);
  const words = vocabulary(rng, 4096);
  const lines: string[] = [];
  for (let size = 0; size < bytes; ) {
    const line = `# ${codeLine(rng, words).trim()}`;
    lines.push(line);
    size += line.length + 1;
  }
  return `${lines.join("\n")}\n`;
}

function writePadding(dir: string, bytes: number, seed: string): void {
  if (bytes <= 0) return;
  const rng = new Prng(seed);
  const words = vocabulary(rng, 4096);
  let written = 0;
  for (let file = 0; written < bytes; file++) {
    const sub = join(dir, `m${String(Math.floor(file / 64)).padStart(3, "0")}`);
    if (file % 64 === 0) mkdirSync(sub, { recursive: true });
    const target = Math.min(PADDING_FILE_BYTES, bytes - written);
    const lines: string[] = [];
    let size = 0;
    while (size < target) {
      const line = codeLine(rng, words);
      lines.push(line);
      size += line.length + 1;
    }
    const text = `${lines.join("\n")}\n`;
    writeFileSync(join(sub, `${rng.pick(words)}-${file}.js`), text);
    written += text.length;
  }
}

// --- Node dist mirror ------------------------------------------------------------

/** `npm pack` into the cache once; returns the .tgz path. */
async function npmPack(spec: string, log: (line: string) => void): Promise<string> {
  const dir = join(cacheDir(), "npm");
  mkdirSync(dir, { recursive: true });
  const [name, version] = [spec.slice(0, spec.lastIndexOf("@")), spec.slice(spec.lastIndexOf("@") + 1)];
  const tgz = join(dir, `${name.replace(/^@/, "").replace(/\//g, "-")}-${version}.tgz`);
  if (existsSync(tgz)) return tgz;
  log(`npm pack ${spec}`);
  await run(["npm", "pack", spec, "--silent", "--pack-destination", dir], { cwd: dir, timeoutMs: 10 * 60_000 });
  if (!existsSync(tgz)) throw new Error(`npm pack ${spec} did not produce ${tgz}`);
  return tgz;
}

export async function buildNodeMirror(input: NodeMirrorSpec = DEFAULT_NODE, log: (line: string) => void = () => {}): Promise<BuiltNode> {
  const spec: Required<NodeMirrorSpec> = { ...DEFAULT_NODE, ...input };
  const base = `node-v${spec.version}-linux-${spec.arch}`;
  const fileName = `${base}.tar.xz`;
  const mirrorDir = join(cacheDir(), "node-mirror", keyOf(spec));
  const releaseDir = join(mirrorDir, `v${spec.version}`);
  const path = join(releaseDir, fileName);
  if (!existsSync(join(releaseDir, "SHASUMS256.txt"))) {
    const nodeTgz = await npmPack(`node-linux-${spec.arch}@${spec.version}`, log);
    const npmTgz = await npmPack(`npm@${spec.npmVersion}`, log);
    log(`building ${fileName}`);
    const staging = join(mirrorDir, `staging-${process.pid}`);
    rmSync(staging, { recursive: true, force: true });
    const top = join(staging, base);
    const npmDir = join(top, "lib", "node_modules", "npm");
    mkdirSync(npmDir, { recursive: true });
    await run(["tar", "-xzf", nodeTgz, "-C", top, "--strip-components=1", "--no-same-owner"]);
    await run(["tar", "-xzf", npmTgz, "-C", npmDir, "--strip-components=1", "--no-same-owner"]);
    rmSync(join(top, "package.json"), { force: true }); // npm's metadata, not in the official tarball
    chmodSync(join(top, "bin", "node"), 0o755);
    // The official tarball links npm and npx into bin/.
    symlinkSync("../lib/node_modules/npm/bin/npm-cli.js", join(top, "bin", "npm"));
    symlinkSync("../lib/node_modules/npm/bin/npx-cli.js", join(top, "bin", "npx"));
    await packTarXz(staging, base, path, spec.xzLevel);
    rmSync(staging, { recursive: true, force: true });
    const meta = await builtFile(path);
    const shasums = join(releaseDir, "SHASUMS256.txt");
    writeFileSync(`${shasums}.${process.pid}`, `${meta.sha256}  ${fileName}\n`);
    renameSync(`${shasums}.${process.pid}`, shasums); // its presence means "built"
  }
  return { ...(await builtFile(path)), spec, fileName, mirrorDir };
}

// --- the published site ------------------------------------------------------------

export interface PublishedBundle {
  artifact: BundleName;
  version: string;
  url: string;
  manifestUrl: string;
  /** What the manifest says (wrong on purpose when asked). */
  sha256: string;
  size_bytes: number;
  strip_components: number;
  expected_files: string[];
  executables: string[];
  /** The published image, when there is one (its sha256 as the manifest says). */
  image: { url: string; sha256: string; size_bytes: number } | null;
}

export interface PublishedSite {
  dir: string;
  baseUrl: string;
  bundles: Record<BundleName, PublishedBundle>;
  node: { version: string; dist_url: string; sha256: string };
  /** cloudflared's .deb, the fourth artifact, when it was published. */
  cloudflared?: { version: string; url: string; sha256: string; size_bytes: number; manifestUrl: string };
}

// --- cloudflared (stand-in) ------------------------------------------------------

const CLOUDFLARED_SOURCE = fileURLToPath(new URL("../src/cloudflared.py", import.meta.url));
export const CLOUDFLARED_VERSION = "2025.1.0";

export interface BuiltDeb extends BuiltFile {
  version: string;
}

/**
 * A stand-in cloudflared package (`/usr/bin/cloudflared`, python3, Architecture
 * all) built with dpkg-deb: it records its arguments and the sha256 of
 * TUNNEL_TOKEN, then waits. Cached by its inputs.
 */
export async function buildCloudflaredDeb(version = CLOUDFLARED_VERSION, log: (line: string) => void = () => {}): Promise<BuiltDeb> {
  const program = readFileSync(CLOUDFLARED_SOURCE, "utf8").replace("@VERSION@", version);
  const dir = join(cacheDir(), "artifacts", "cloudflared", `${version}-${keyOf({ version, program })}`);
  const path = join(dir, `cloudflared_${version}_all.deb`);
  if (!existsSync(path)) {
    log(`building the stand-in cloudflared ${version} .deb`);
    const staging = join(dir, `staging-${process.pid}`);
    rmSync(staging, { recursive: true, force: true });
    mkdirSync(join(staging, "DEBIAN"), { recursive: true });
    mkdirSync(join(staging, "usr", "bin"), { recursive: true });
    writeFileSync(
      join(staging, "DEBIAN", "control"),
      [
        "Package: cloudflared",
        `Version: ${version}`,
        "Architecture: all",
        "Maintainer: host-testbed <testbed@example.org>",
        "Depends: python3",
        "Description: stand-in cloudflared for the bootstrap tests",
        " Records its arguments and a hash of TUNNEL_TOKEN, then waits.",
        "",
      ].join("\n"),
    );
    writeFileSync(join(staging, "usr", "bin", "cloudflared"), program);
    chmodSync(join(staging, "usr", "bin", "cloudflared"), 0o755);
    const part = `${path}.${process.pid}.part`;
    await run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", staging, part]);
    renameSync(part, path);
    rmSync(staging, { recursive: true, force: true });
  }
  return { ...(await builtFile(path)), version };
}

export interface PublishOptions {
  /** The manifest and .sha256 of this bundle carry a wrong checksum. */
  wrongChecksum?: BundleName;
  /** Also publish cloudflared's .deb as the fourth artifact (manifest and .sha256). */
  cloudflared?: BuiltDeb;
  /**
   * Arch the manifests are published for (default amd64). The bundles hold
   * only python3 and shell, so one build serves every arch.
   */
  arch?: Arch;
  /** Images to publish beside the archives (`image` entries in the manifests), by bundle. */
  images?: Partial<Record<BundleName, BuiltFile>>;
  /** This bundle's image is served with flipped bytes (its manifest keeps the true sha256). */
  corruptImage?: BundleName;
}

/**
 * Lay out `dir` (served at `baseUrl`) with links to the cached files, the
 * manifests (`<artifact>/latest-linux-<arch>.json`: url, sha256, size_bytes,
 * built_at, os, arch) and `.sha256` files (`<hex>  <name>`).
 */
export function publishSite(dir: string, baseUrl: string, bundles: BuiltBundle[], node: BuiltNode, opts: PublishOptions = {}): PublishedSite {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const base = baseUrl.replace(/\/+$/, "");
  const arch = opts.arch ?? "amd64";
  const out = {} as Record<BundleName, PublishedBundle>;
  for (const b of bundles) {
    const name = dashName(b.spec.artifact);
    const fileName = bundleLayout(b.spec.artifact, b.spec.version, arch, b.spec.compression).fileName;
    const rel = `${name}/${b.spec.version}/${fileName}`;
    mkdirSync(join(dir, name, b.spec.version), { recursive: true });
    symlinkSync(b.path, join(dir, rel));
    const sha256 = opts.wrongChecksum === b.spec.artifact ? createHash("sha256").update(`not ${b.sha256}`).digest("hex") : b.sha256;
    writeFileSync(join(dir, `${rel}.sha256`), `${sha256}  ${fileName}\n`);
    const url = `${base}/${rel}`;
    const built = opts.images?.[b.spec.artifact];
    let image: PublishedBundle["image"] = null;
    if (built) {
      const imageRel = `${name}/${b.spec.version}/${withoutArchiveSuffix(fileName, ".sqfs")}`;
      if (opts.corruptImage === b.spec.artifact) {
        const bytes = readFileSync(built.path);
        for (let i = 1024; i < bytes.length; i += 4096) bytes[i] = bytes[i]! ^ 0xff;
        writeFileSync(join(dir, imageRel), bytes);
      } else {
        symlinkSync(built.path, join(dir, imageRel));
      }
      image = { url: `${base}/${imageRel}`, sha256: built.sha256, size_bytes: built.size_bytes };
    }
    const manifest = {
      url,
      sha256,
      size_bytes: b.size_bytes,
      built_at: new Date(statSync(b.path).mtimeMs).toISOString(),
      os: "linux",
      arch,
      ...(image ? { image } : {}),
    };
    writeFileSync(join(dir, name, `latest-linux-${arch}.json`), `${JSON.stringify(manifest, null, 2)}\n`);
    out[b.spec.artifact] = {
      artifact: b.spec.artifact,
      version: b.spec.version,
      url,
      manifestUrl: `${base}/${name}/latest-linux-${arch}.json`,
      sha256,
      size_bytes: b.size_bytes,
      strip_components: b.stripComponents,
      expected_files: b.expectedFiles,
      executables: b.executables,
      image,
    };
  }
  mkdirSync(join(dir, "node"), { recursive: true });
  symlinkSync(join(node.mirrorDir, `v${node.spec.version}`), join(dir, "node", `v${node.spec.version}`));
  const site: PublishedSite = { dir, baseUrl: base, bundles: out, node: { version: node.spec.version, dist_url: `${base}/node`, sha256: node.sha256 } };
  const deb = opts.cloudflared;
  if (deb) {
    const fileName = `cloudflared-linux-${arch}.deb`;
    const rel = `cloudflared/${deb.version}/${fileName}`;
    mkdirSync(join(dir, "cloudflared", deb.version), { recursive: true });
    symlinkSync(deb.path, join(dir, rel));
    writeFileSync(join(dir, `${rel}.sha256`), `${deb.sha256}  ${fileName}\n`);
    const manifest = {
      url: `${base}/${rel}`,
      sha256: deb.sha256,
      size_bytes: deb.size_bytes,
      built_at: new Date(statSync(deb.path).mtimeMs).toISOString(),
      os: "linux",
      arch,
    };
    writeFileSync(join(dir, "cloudflared", `latest-linux-${arch}.json`), `${JSON.stringify(manifest, null, 2)}\n`);
    site.cloudflared = {
      version: deb.version,
      url: manifest.url,
      sha256: deb.sha256,
      size_bytes: deb.size_bytes,
      manifestUrl: `${base}/cloudflared/latest-linux-${arch}.json`,
    };
  }
  return site;
}

/** Default small bundles for the tests; the benchmark passes its own sizes. */
export function testBundleSpecs(version = "1.0.0", paddingBytes = 2_000_000): BundleSpec[] {
  return BUNDLES.map((artifact) => ({ artifact, version, paddingBytes: artifact === "project_host" ? paddingBytes / 2 : paddingBytes }));
}
