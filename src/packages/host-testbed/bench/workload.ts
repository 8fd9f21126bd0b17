/**
 * The benchmark's reference workload: three bundles as `.tar.xz` at the
 * sizes of the real ones (download size: project-host ~100 MB, project
 * ~250 MB, tools ~50 MB, times --scale), with content that behaves like real
 * software for xz: source-like text (identifiers drawn with a skewed, Zipf-
 * like frequency, as in real code) mixed with binary-like files (skewed byte
 * distribution with short repeats, like machine code and data sections).
 * Together they pack about 3.6x, like real release tarballs, and have many
 * small files, so extraction costs what it costs for real.
 *
 * The tar stream is written here (plain ustar) straight into `xz -T0`, so no
 * gigabyte-sized staging tree lands on the shared disk. Bundles are built
 * once and cached by recipe, size and version.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { type BuiltBundle, type BundleName, bundleLayout, dashName, PROJECT_HOST_EXEC, sha256File, TOOL_NAMES } from "../src/artifacts.js";
import { cacheDir } from "../src/paths.js";
import { Prng } from "../src/prng.js";
import { run } from "../src/proc.js";

export { Prng };

/** Bump when the content recipe changes (4: the real bundles' names and layouts, from the testbed). */
const RECIPE_VERSION = 4;
/** Reproducible tarballs: fixed mtime (2024-01-01). */
const MTIME = 1704067200;
const MB = 1_000_000;

/** Download (compressed) sizes of the real bundles, bytes. */
export const REFERENCE_SIZES: Record<BundleName, number> = { project_host: 100 * MB, project: 250 * MB, tools: 50 * MB };
/** The order the hub lists them in. */
export const WORKLOAD_BUNDLES: BundleName[] = ["project_host", "project", "tools"];
/** Uncompressed ÷ compressed of this recipe at xz -6 (measured; used to size the content). */
export const EXPECTED_RATIO = 3.6;
/** Share of the uncompressed bytes that is source-like text; the rest is binary-like. */
const TEXT_SHARE = 0.75;
export const BASE_VERSION = "1.0.0";

export interface WorkloadBundleSpec {
  artifact: BundleName;
  version: string;
  /** Uncompressed content bytes (approximate). */
  contentBytes: number;
  xzLevel: number;
}

export interface WorkloadBundle extends BuiltBundle {
  /** Uncompressed bytes in the tarball (file contents). */
  contentBytes: number;
  files: number;
}

/**
 * xz preset for building. Level 2 builds ~8x faster than 6 here (2 cores)
 * and, with -6's block size (24 MiB, so `xz -T0` decompresses blocks in
 * parallel the same way), decompresses at the same speed; it packs a little
 * less (3.6x instead of 4.4x on this content).
 */
export const DEFAULT_XZ_LEVEL = 2;
const XZ_BLOCK_SIZE = "24MiB";

export function workloadSpecs(scale: number, version = BASE_VERSION, xzLevel = DEFAULT_XZ_LEVEL): WorkloadBundleSpec[] {
  if (!(scale > 0)) throw new Error(`scale must be > 0, got ${scale}`);
  return WORKLOAD_BUNDLES.map((artifact) => ({
    artifact,
    version,
    contentBytes: Math.max(64 * 1024, Math.round(REFERENCE_SIZES[artifact] * scale * EXPECTED_RATIO)),
    xzLevel,
  }));
}

const DAEMON_SOURCE = fileURLToPath(new URL("../src/daemon.py", import.meta.url));

/**
 * Build (or reuse from the cache) one bundle in the testbed's layout (`bundleLayout`: the real bundles'
 * names, top directories and executables), with the content under `<top>/lib` (project: `bundle/node_modules`).
 */
export async function buildWorkloadBundle(spec: WorkloadBundleSpec, log: (line: string) => void = () => {}): Promise<WorkloadBundle> {
  const daemon = spec.artifact === "project_host" ? readFileSync(DAEMON_SOURCE, "utf8") : "";
  const key = createHash("sha256").update(JSON.stringify({ RECIPE_VERSION, TEXT_SHARE, XZ_BLOCK_SIZE, spec, daemon })).digest("hex").slice(0, 16);
  const name = dashName(spec.artifact);
  const layout = bundleLayout(spec.artifact, spec.version);
  const fileName = layout.fileName;
  const path = join(cacheDir(), "bench-workload", `${name}-${spec.version}-${key}`, fileName);
  const topDir = layout.top;
  const executables = layout.executables;
  const metaPath = `${path}.meta.json`;
  if (!existsSync(metaPath)) {
    const t0 = Date.now();
    log(`building ${fileName} (${(spec.contentBytes / MB).toFixed(0)} MB of content, xz -${spec.xzLevel}) ...`);
    const exe = daemon.replace("@VERSION@", spec.version);
    const files = await packBundle(path, topDir, spec, exe);
    const meta = { path, sha256: await sha256File(path), size_bytes: statSync(path).size, contentBytes: spec.contentBytes, files };
    writeFileSync(metaPath, JSON.stringify(meta));
    log(
      `built ${fileName}: ${(meta.size_bytes / MB).toFixed(1)} MB, ratio ${(spec.contentBytes / meta.size_bytes).toFixed(2)}x, ${files} files, ${((Date.now() - t0) / 1000).toFixed(0)} s`,
    );
  }
  const meta = JSON.parse(readFileSync(metaPath, "utf8")) as { path: string; sha256: string; size_bytes: number; contentBytes: number; files: number };
  return {
    ...meta,
    spec: { artifact: spec.artifact, version: spec.version, paddingBytes: spec.contentBytes, xzLevel: spec.xzLevel },
    fileName,
    topDir,
    stripComponents: layout.strip_components,
    expectedFiles: layout.expected_files,
    executables,
  };
}

/**
 * The same archive published under another version: what the hub sees when
 * only that bundle's version changed. Same bytes (building another 900 MB
 * tarball would only cost time; the bootstrap downloads and extracts it
 * all the same), new URL path, so the hub derives the new version.
 */
export function asVersion(bundle: WorkloadBundle, version: string): WorkloadBundle {
  return { ...bundle, spec: { ...bundle.spec, version }, fileName: bundleLayout(bundle.spec.artifact, version, "amd64", bundle.spec.compression).fileName };
}

/** zstd level of the bench's `.tar.zst` archives unless `--zstd-level` says otherwise (as small as xz -6 on this content). */
export const DEFAULT_ZSTD_LEVEL = 19;

/**
 * The same tar content as `bundle`'s `.tar.xz`, as a `.tar.zst` (`xz -dc | zstd -T0 -<level>`), cached beside the
 * `.tar.xz` keyed by level (`<name>.z<level>.tar.zst`), like the images. Published under the real bundle's `.tar.zst`
 * name (`bundleLayout` with zstd): spec.compression says so.
 */
export async function buildWorkloadZst(bundle: WorkloadBundle, level = DEFAULT_ZSTD_LEVEL, log: (line: string) => void = () => {}): Promise<WorkloadBundle> {
  if (!Number.isInteger(level) || level < 1 || level > 22) throw new Error(`zstd level must be an integer 1..22, got ${level}`);
  if (!bundle.path.endsWith(".tar.xz")) throw new Error(`${bundle.path}: not a .tar.xz`);
  const path = bundle.path.replace(/\.tar\.xz$/, `.z${level}.tar.zst`);
  const metaPath = `${path}.meta.json`;
  if (!existsSync(metaPath)) {
    const t0 = Date.now();
    log(`building ${bundle.fileName.replace(/\.tar\.xz$/, ".tar.zst")} (zstd -T0 -${level} of the same tar) ...`);
    const part = `${path}.${process.pid}.part`; // unique: another process may build the same file
    // --ultra: levels above 19 need it (and it is harmless below)
    await run(["bash", "-c", 'set -o pipefail; xz -dc -- "$1" | zstd -T0 --ultra -"$2" -q -c > "$3"', "bash", bundle.path, String(level), part], {
      timeoutMs: 3 * 60 * 60_000,
    });
    renameSync(part, path);
    const meta = { sha256: await sha256File(path), size_bytes: statSync(path).size };
    writeFileSync(`${metaPath}.${process.pid}`, JSON.stringify(meta));
    renameSync(`${metaPath}.${process.pid}`, metaPath);
    log(`built ${path}: ${(meta.size_bytes / MB).toFixed(1)} MB (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
  }
  const meta = JSON.parse(readFileSync(metaPath, "utf8")) as { sha256: string; size_bytes: number };
  return {
    ...bundle,
    path,
    sha256: meta.sha256,
    size_bytes: meta.size_bytes,
    spec: { ...bundle.spec, compression: "zstd", zstdLevel: level },
    fileName: bundleLayout(bundle.spec.artifact, bundle.spec.version, "amd64", "zstd").fileName,
  };
}

// --- the tar stream --------------------------------------------------------------

/** tar (ustar, sorted, root-owned, fixed mtime) | xz -T0 -<level> > path. Returns the file count. */
async function packBundle(path: string, topDir: string, spec: WorkloadBundleSpec, daemon: string): Promise<number> {
  mkdirSync(dirname(path), { recursive: true });
  const part = `${path}.part`;
  const xz = spawn("bash", ["-c", 'xz -T0 -"$1" --block-size="$2" -c > "$3"', "bash", String(spec.xzLevel), XZ_BLOCK_SIZE, part], {
    stdio: ["pipe", "ignore", "pipe"],
  });
  let stderr = "";
  xz.stderr!.on("data", (b: Buffer) => (stderr += b.toString()));
  const done = new Promise<number>((resolve, reject) => {
    xz.on("error", reject);
    xz.on("close", (code) => resolve(code ?? 1));
  });
  const tar = new TarWriter((chunk) => writeAll(xz.stdin!, chunk));
  let files = 0;
  const sh = (text: string) => Buffer.from(`#!/bin/sh\n${text}\n`);
  await tar.dir(`${topDir}/`);
  let content = `${topDir}/lib`;
  if (spec.artifact === "project_host") {
    await tar.file(`${topDir}/${PROJECT_HOST_EXEC}`, Buffer.from(daemon), 0o755);
    await tar.symlink(`${topDir}/node`, PROJECT_HOST_EXEC);
    files += 2;
  } else if (spec.artifact === "tools") {
    for (const tool of TOOL_NAMES) await tar.file(`${topDir}/${tool}`, sh(`echo "${tool} ${spec.version}"`), 0o755);
    files += TOOL_NAMES.length;
  } else {
    await tar.file(`${topDir}/index.js`, Buffer.from(`console.log("project ${spec.version}");\n`), 0o644);
    await tar.file(`${topDir}/package.json`, Buffer.from(`{"name":"@cocalc/project","version":"${spec.version}"}\n`), 0o644);
    await tar.dir(`${topDir}/build/`);
    for (const d of ["src/", "src/packages/", "src/packages/project/", "src/packages/project/bin/"]) await tar.dir(`${topDir}/${d}`);
    await tar.file(`${topDir}/src/packages/project/bin/cocalc-project`, sh('exec node "$(dirname "$0")/../../../../index.js" "$@"'), 0o755);
    files += 3;
    content = `${topDir}/node_modules`;
  }
  files += await writeContent(tar, content, spec.contentBytes, `${spec.artifact}-${spec.contentBytes}`);
  await tar.end();
  xz.stdin!.end();
  const code = await done;
  if (code !== 0) {
    rmSync(part, { force: true });
    throw new Error(`xz failed (exit ${code}): ${stderr.trim()}`);
  }
  renameSync(part, path);
  return files;
}

function writeAll(stream: NodeJS.WritableStream, chunk: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const ok = stream.write(chunk, (e) => (e ? reject(e) : undefined));
    if (ok) resolve();
    else stream.once("drain", resolve);
  });
}

/** Minimal ustar writer: directories and regular files, names up to 255 bytes. */
export class TarWriter {
  constructor(private readonly sink: (chunk: Buffer) => Promise<void>) {}

  dir(name: string): Promise<void> {
    return this.sink(header(name, 0, 0o755, "5"));
  }

  symlink(name: string, target: string): Promise<void> {
    return this.sink(header(name, 0, 0o777, "2", target));
  }

  async file(name: string, body: Buffer, mode: number): Promise<void> {
    await this.sink(header(name, body.length, mode, "0"));
    await this.sink(body);
    const pad = (512 - (body.length % 512)) % 512;
    if (pad) await this.sink(Buffer.alloc(pad));
  }

  end(): Promise<void> {
    return this.sink(Buffer.alloc(1024));
  }
}

function header(name: string, size: number, mode: number, type: "0" | "2" | "5", linkname = ""): Buffer {
  const h = Buffer.alloc(512);
  let prefix = "";
  let base = name;
  if (Buffer.byteLength(name) > 100) {
    const cut = name.lastIndexOf("/", Math.min(name.length - 2, 155));
    prefix = name.slice(0, cut);
    base = name.slice(cut + 1);
    if (cut < 0 || Buffer.byteLength(prefix) > 155 || Buffer.byteLength(base) > 100) throw new Error(`tar name too long: ${name}`);
  }
  const put = (text: string, off: number, len: number) => h.write(text, off, len, "utf8");
  put(base, 0, 100);
  put(`${mode.toString(8).padStart(7, "0")}\0`, 100, 8);
  put("0000000\0", 108, 8); // uid
  put("0000000\0", 116, 8); // gid
  put(`${size.toString(8).padStart(11, "0")}\0`, 124, 12);
  put(`${MTIME.toString(8).padStart(11, "0")}\0`, 136, 12);
  put("        ", 148, 8); // checksum placeholder: spaces while summing
  put(type, 156, 1);
  put(linkname, 157, 100);
  put("ustar\0", 257, 6);
  put("00", 263, 2);
  put("root", 265, 32);
  put("root", 297, 32);
  put(prefix, 345, 155);
  let sum = 0;
  for (const b of h) sum += b;
  put(`${sum.toString(8).padStart(6, "0")}\0 `, 148, 8);
  return h;
}

// --- content that compresses like software -------------------------------------------

const KEYWORDS = [
  "const",
  "let",
  "return",
  "if",
  "else",
  "for",
  "function",
  "await",
  "async",
  "import",
  "export",
  "new",
  "this",
  "null",
  "true",
  "false",
  "def",
  "self",
  "class",
  "while",
];
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
  "st",
  "an",
  "er",
  "on",
];

function vocabulary(rng: Prng, size: number): string[] {
  const words: string[] = [];
  for (let i = 0; i < size; i++) {
    let w = "";
    for (let j = 2 + (rng.next() % 3); j > 0; j--) w += SYLLABLES[rng.next() % SYLLABLES.length];
    words.push(rng.next() % 3 === 0 ? `${w}${SYLLABLES[rng.next() % SYLLABLES.length]!.toUpperCase()}${w.slice(0, 3)}` : w);
  }
  return words;
}

function codeLine(rng: Prng, words: string[]): string {
  const w = () => words[rng.skewed(words.length)]!;
  const indent = "    ".slice(0, 2 * (rng.next() % 3)) + "  ".repeat(rng.skewed(4));
  switch (rng.next() % 6) {
    case 0:
      return `${indent}${KEYWORDS[rng.skewed(KEYWORDS.length)]} ${w()} = ${w()}(${w()}, ${rng.skewed(1000)});`;
    case 1:
      return `${indent}if (${w()}.${w()} !== ${w()}) { ${w()}.${w()}(); }`;
    case 2:
      return `${indent}// ${w()} ${w()} ${w()} ${w()} ${w()}`;
    case 3:
      return `${indent}export function ${w()}(${w()}, ${w()}) {`;
    case 4:
      return `${indent}}`;
    default:
      return `${indent}return ${w()}.${w()}[${rng.skewed(64)}] + "${w()}";`;
  }
}

function textFile(rng: Prng, words: string[], size: number): Buffer {
  const lines: string[] = [];
  let n = 0;
  while (n < size) {
    const line = codeLine(rng, words);
    lines.push(line);
    n += line.length + 1;
  }
  return Buffer.from(`${lines.join("\n")}\n`);
}

/**
 * Binary-like bytes: a skewed byte distribution (zeros and a few common
 * opcodes dominate, as in machine code) with short back-references (repeated
 * instruction sequences). xz packs it about 1.7x.
 */
function binaryFile(rng: Prng, size: number): Buffer {
  const out = Buffer.allocUnsafe(size);
  const common = [0x00, 0xff, 0x48, 0x89, 0x8b, 0xe8, 0x0f, 0x24, 0x83, 0xc3, 0x01, 0x20];
  let i = 0;
  while (i < size) {
    const r = rng.next();
    if (i > 4096 && (r & 7) === 0) {
      const len = Math.min(size - i, 8 + ((r >>> 3) & 63));
      const from = i - 1 - ((r >>> 9) % 4096);
      out.copyWithin(i, from, from + len);
      i += len;
      continue;
    }
    const x = rng.next();
    out[i++] = (x & 3) === 0 ? common[(x >>> 2) % common.length]! : x >>> 24;
  }
  return out;
}

/** Files under `dir` totalling about `bytes`: TEXT_SHARE source-like text, the rest binary-like. */
async function writeContent(tar: TarWriter, dir: string, bytes: number, seed: string): Promise<number> {
  const rng = new Prng(seed);
  const words = vocabulary(rng, 6000);
  let text = 0;
  let binary = 0;
  let files = 0;
  await tar.dir(`${dir}/`);
  for (let pkg = 0; text + binary < bytes; pkg++) {
    const pkgDir = `${dir}/${words[pkg % words.length]}-${pkg}`;
    await tar.dir(`${pkgDir}/`);
    for (let f = 0; f < 40 && text + binary < bytes; f++) {
      const wantText = text <= TEXT_SHARE * (text + binary);
      const left = bytes - text - binary;
      if (wantText) {
        const body = textFile(rng, words, Math.min(left, rng.logUniform(512, 192 * 1024)));
        await tar.file(`${pkgDir}/${words[rng.next() % words.length]}-${f}.js`, body, 0o644);
        text += body.length;
      } else {
        const body = binaryFile(rng, Math.max(1, Math.min(left, rng.logUniform(64 * 1024, 4 * MB))));
        await tar.file(`${pkgDir}/${words[rng.next() % words.length]}-${f}.node`, body, 0o755);
        binary += body.length;
      }
      files++;
    }
  }
  return files;
}
