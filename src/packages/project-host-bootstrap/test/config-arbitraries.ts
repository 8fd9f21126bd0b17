/**
 * fast-check generators for configs that both validators must judge alike:
 * a valid vector from fixtures/configs/valid, then one to four edits (set a
 * field, drop it, add a key), where the values are drawn from grammars of the
 * things the contract is about — URLs, host names, paths, Debian package names,
 * unit names, numbers at and past every bound, text with control characters,
 * unpaired surrogates and line separators, deep nesting — as well as any JSON.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import fc from "fast-check";

const VALID = fileURLToPath(new URL("../fixtures/configs/valid/", import.meta.url));

export const validConfigs: Record<string, unknown>[] = readdirSync(VALID)
  .filter((f) => f.endsWith(".json"))
  .sort()
  .map((f) => (JSON.parse(readFileSync(join(VALID, f), "utf8")) as { config: Record<string, unknown> }).config);

type Path = (string | number)[];

/** Every path in a JSON value (objects' keys and arrays' indices), the root excluded. */
function pathsOf(value: unknown, at: Path = []): Path[] {
  if (value === null || typeof value !== "object") return [];
  const entries: [string | number, unknown][] = Array.isArray(value) ? value.map((v, i) => [i, v]) : Object.entries(value);
  return entries.flatMap(([k, v]) => [[...at, k], ...pathsOf(v, [...at, k])]);
}

/** Paths of every field the schema knows (from the fullest vector), so edits also create absent optional fields. */
const schemaPaths: Path[] = pathsOf(validConfigs.reduce((a, b) => (JSON.stringify(b).length > JSON.stringify(a).length ? b : a)));

// --- value grammars ----------------------------------------------------------------

/** Characters the rules care about, mixed with ordinary ones. */
const nastyChar = fc.constantFrom(
  "\0",
  "\t",
  "\n",
  "\r",
  "\x1b",
  "\x1f",
  "\x7f",
  "\x80",
  "\x85",
  "\x9f",
  "\xa0",
  "\u2028",
  "\u2029",
  "\ufeff",
  "\ud800",
  "\udfff",
  "\ud83d\ude00",
  "ñ",
  "é",
  "ß",
  "İ",
  "\u0130",
  "\u212a",
  "Ⅸ",
  "ｆ",
  "。",
  " ",
  "/",
  ".",
  "%",
  "@",
  ":",
  "[",
  "]",
  "\\",
  "-",
  "+",
  "=",
  "#",
  "?",
  "~",
  "'",
  '"',
  "$",
  "(",
  "`",
  "*",
  "&",
  ";",
  ",",
  "_",
);
const text = fc.oneof(
  { weight: 3, arbitrary: fc.string({ unit: fc.oneof(nastyChar, fc.constantFrom("a", "b", "z", "0", "9", "A")), maxLength: 12 }) },
  { weight: 1, arbitrary: fc.string({ unit: "binary", maxLength: 12 }) },
  { weight: 1, arbitrary: fc.string({ unit: "grapheme-ascii", maxLength: 12 }) },
);

const label = fc.oneof(
  fc.constantFrom(
    "a",
    "hub",
    "example",
    "com",
    "xn--ida",
    "xn--bcher-kva",
    "localhost",
    "a-b",
    "-a",
    "a-",
    "0",
    "09",
    "0x7f",
    "1e3",
    "ñ",
    "bücher",
    "a_b",
    "ＡＢ",
    "",
    "A".repeat(63),
    "a".repeat(64),
  ),
  fc.stringMatching(/^[a-z0-9-]{1,8}$/),
);
const octet = fc.oneof(fc.integer({ min: 0, max: 300 }).map(String), fc.constantFrom("00", "010", "0x10", "0X1F", "255", "256", "4294967295", ""));
const hostName = fc.oneof(
  fc.array(label, { minLength: 1, maxLength: 4 }).chain((ls) => fc.constantFrom(ls.join("."), `${ls.join(".")}.`)),
  fc.array(octet, { minLength: 1, maxLength: 5 }).map((os) => os.join(".")),
  fc.ipV4(),
  fc.ipV4Extended(),
  fc.domain(),
  fc.constantFrom(`${"a".repeat(250)}.com`, `${"a.".repeat(126)}a`, `${"a.".repeat(127)}a`),
);
const ipv6 = fc.oneof(
  fc.ipV6(),
  fc
    .array(fc.oneof(fc.stringMatching(/^[0-9a-fA-F]{0,5}$/), fc.ipV4(), fc.constantFrom("", ":", "::", "%25eth0")), { maxLength: 10 })
    .map((gs) => gs.join(":")),
);
const host = fc.oneof({ weight: 4, arbitrary: hostName }, { weight: 2, arbitrary: ipv6.map((a) => `[${a}]`) }, { weight: 1, arbitrary: text });
const port = fc.oneof(
  fc.constant(""),
  fc.integer({ min: 0, max: 70000 }).map((p) => `:${p}`),
  fc.constantFrom(":", ":0080", ":8a", ":-1", ":65535", ":65536"),
);
const urlRest = fc.oneof(
  fc.constant(""),
  fc.webPath(),
  fc.webPath().chain((p) => fc.webQueryParameters().map((q) => `${p}?${q}`)),
  fc.webFragments().map((f) => `/#${f}`),
  text.map((t) => `/${t}`),
  fc.constantFrom("/%20", "/%zz", "/%", "/a\\b", "/ü", "?x=1#f", "#", "/a b", "/~u/;a=b,c!$&'()*+@:"),
);
const scheme = fc.constantFrom("http://", "https://", "http://", "https://", "HTTP://", "ftp://", "http:", "http:\\\\", "http:///", "ws://", "");
const userinfo = fc.constantFrom("", "", "", "", "u@", "u:p@", "@", ":@");
export const url = fc.oneof(
  { weight: 5, arbitrary: fc.tuple(scheme, userinfo, host, port, urlRest).map((parts) => parts.join("")) },
  { weight: 1, arbitrary: fc.webUrl({ withQueryParameters: true, withFragments: true }) },
  { weight: 1, arbitrary: text },
);

const segment = fc.oneof(
  fc.constantFrom(
    "home",
    "ubuntu",
    "cocalc-host",
    "bootstrap",
    "btrfs",
    "btrfs.img",
    "srv",
    "etc",
    "usr",
    "local",
    "var",
    "lib",
    "tmp",
    "dev",
    "sda",
    "root",
    "mnt",
    ".",
    "..",
    "",
    "...",
  ),
  text,
);
/** Paths built from a pool of related prefixes, so the cross-field rules (inside, above, equal) meet each other. */
const pathPool = [
  "/",
  "/home",
  "/home/ubuntu",
  "/home/ubuntu/cocalc-host",
  "/home/ubuntu/cocalc-host/bootstrap",
  "/home/ubuntu/cocalc-host/btrfs.img",
  "/home/ubuntu/cocalc-host/bootstrap/x.img",
  "/btrfs",
  "/srv",
  "/srv/btrfs",
  "/etc/cocalc",
  "/usr/local",
  "/var/lib",
  "/var/lib/x",
  "/dev/sda",
  "/root",
  "/tmp/x",
];
export const absPath = fc.oneof(
  { weight: 3, arbitrary: fc.constantFrom(...pathPool) },
  {
    weight: 3,
    arbitrary: fc
      .tuple(fc.constantFrom(...pathPool), fc.array(segment, { maxLength: 3 }))
      .map(([p, s]) => (s.length ? `${p === "/" ? "" : p}/${s.join("/")}` : p)),
  },
  { weight: 1, arbitrary: fc.array(segment, { maxLength: 4 }).map((s) => s.join("/")) },
);

const packageName = fc.oneof(fc.stringMatching(/^[a-z0-9.+=/:-]{0,8}$/), fc.constantFrom("g++", "git-", "a", "a-", "-a", "python3.12", "x=1", "Git"));
const unitName = fc.oneof(
  fc.stringMatching(/^[a-z-]{0,8}$/).map((s) => `cocalc-${s}`),
  fc.constantFrom("ssh", "cocalc-", "cocalc-a@", "cocalc-a.service", `cocalc-${"a".repeat(201)}`),
  text,
);

const number = fc.oneof(
  fc.integer(),
  fc.integer({ min: -3, max: 70000 }),
  fc.constantFrom(
    0,
    -0,
    1,
    0.5,
    1.0,
    2 ** 53 - 1,
    2 ** 53,
    2 ** 53 + 2,
    -(2 ** 53),
    1e21,
    1e308,
    Number.MAX_VALUE,
    Infinity,
    -Infinity,
    65535,
    65536,
    3600,
    3601,
    604800,
    604801,
    2 ** 20,
    2 ** 20 + 1,
  ),
  fc.double(),
);
const deep = fc.integer({ min: 0, max: 40 }).map((n) => {
  let v: unknown = "x";
  for (let i = 0; i < n; i++) v = i % 2 ? { k: v } : [v];
  return v;
});
const key = fc.oneof(fc.constantFrom("extra", "__proto__", "constructor", "toString", "A", "PATH", "a b", "", "ÑAME", "X\n"), text);
const anyJson: fc.Arbitrary<unknown> = fc.oneof(
  fc.constant(null),
  fc.boolean(),
  number,
  text,
  fc.array(fc.oneof(text, number, fc.constant(null)), { maxLength: 4 }),
  fc.dictionary(key, fc.oneof(text, number), { maxKeys: 3 }),
  deep,
);
/** A value for any field: each grammar, the wrong JSON types, and arrays of grammar values. */
export const fieldValue: fc.Arbitrary<unknown> = fc.oneof(
  { weight: 3, arbitrary: url },
  { weight: 3, arbitrary: absPath },
  { weight: 1, arbitrary: hostName },
  { weight: 1, arbitrary: packageName },
  { weight: 1, arbitrary: unitName },
  { weight: 2, arbitrary: number },
  { weight: 2, arbitrary: anyJson },
  { weight: 2, arbitrary: fc.array(fc.oneof(url, absPath, packageName, text), { maxLength: 10 }) },
  { weight: 1, arbitrary: fc.dictionary(key, fc.oneof(text, fc.constantFrom("a\tb", "ok", "")), { maxKeys: 3 }) },
);

const relPath = fc.array(segment, { minLength: 1, maxLength: 3 }).map((s) => s.join("/"));
const envValue = fc.oneof(text, fc.constantFrom("a\tb", "ok", "", "ünïcödé", "a\u2028b", "x".repeat(4097)));

/** The grammar a field's own kind of value comes from (with the generic one mixed in by `valueFor`). */
function grammarFor(path: Path): fc.Arbitrary<unknown> | null {
  const name = String(path.filter((p) => typeof p === "string").at(-1) ?? "");
  const item = typeof path.at(-1) === "number";
  const parent = String(path.at(-2) ?? "");
  if (/url$/.test(name) || name === "conat_urls") return item ? url : fc.array(url, { maxLength: 9 });
  if (["home", "bootstrap_root", "bootstrap_dir", "mount_point", "image_path"].includes(name)) return absPath;
  if (name === "candidates") return item ? absPath : fc.array(absPath, { maxLength: 17 });
  if (name === "expected_files" || name === "executables") return item ? relPath : fc.array(relPath, { maxLength: 65 });
  if (name === "exec") return relPath;
  if (name === "packages") return item ? packageName : fc.array(packageName, { maxLength: 12 });
  if (name === "unit") return unitName;
  if (name === "host" && parent === "tunnel") return hostName;
  if (parent === "env" || name === "env") return name === "env" ? fc.dictionary(key, envValue, { maxKeys: 3 }) : envValue;
  if (/_s$|_gb$|port$|size_bytes|strip_components|schema_version/.test(name)) return number;
  return null;
}

function valueFor(path: Path): fc.Arbitrary<unknown> {
  const own = grammarFor(path);
  return own ? fc.oneof({ weight: 3, arbitrary: own }, { weight: 1, arbitrary: fieldValue }) : fieldValue;
}

export type Edit = { kind: "set"; path: Path; value: unknown } | { kind: "drop"; path: Path } | { kind: "add"; path: Path; key: string; value: unknown };

const edit: fc.Arbitrary<Edit> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.constantFrom(...schemaPaths).chain((path) => valueFor(path).map((value) => ({ kind: "set" as const, path, value }))),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("drop" as const), path: fc.constantFrom(...schemaPaths) }) },
  {
    weight: 1,
    arbitrary: fc.record({ kind: fc.constant("add" as const), path: fc.constantFrom([], ...schemaPaths.filter((p) => p.length === 1)), key, value: anyJson }),
  },
);

function applyEdit(root: Record<string, unknown>, e: Edit): Record<string, unknown> {
  const walk = (node: unknown, path: Path, depth: number): unknown => {
    if (depth === path.length) {
      if (e.kind !== "add" || node === null || typeof node !== "object" || Array.isArray(node)) return node;
      const copy = { ...(node as Record<string, unknown>) };
      Object.defineProperty(copy, e.key, { value: e.value, enumerable: true, writable: true, configurable: true }); // "__proto__" as a key
      return copy;
    }
    const k = path[depth]!;
    const last = depth === path.length - 1 && e.kind !== "add";
    if (Array.isArray(node)) {
      if (typeof k !== "number") return node;
      const copy = [...node];
      if (last && e.kind === "drop") copy.splice(k, 1);
      else if (last && e.kind === "set") copy[k] = e.value;
      else if (k < copy.length) copy[k] = walk(copy[k], path, depth + 1);
      return copy;
    }
    if (node === null || typeof node !== "object" || typeof k !== "string") return node;
    const copy = { ...(node as Record<string, unknown>) };
    if (last && e.kind === "drop") delete copy[k];
    else if (last && e.kind === "set") copy[k] = e.value;
    else if (k in copy) copy[k] = walk(copy[k], path, depth + 1);
    return copy;
  };
  return walk(root, e.kind === "add" ? e.path : e.path, 0) as Record<string, unknown>;
}

/** A config: one of the valid vectors with 0-4 edits (0 keeps the valid vectors in the mix). */
export const config: fc.Arbitrary<unknown> = fc
  .tuple(fc.constantFrom(...validConfigs), fc.array(edit, { maxLength: 4 }))
  .map(([base, edits]) => edits.reduce(applyEdit, base));

/** Now and then not a config at all. */
export const document: fc.Arbitrary<unknown> = fc.oneof({ weight: 20, arbitrary: config }, { weight: 1, arbitrary: anyJson });
