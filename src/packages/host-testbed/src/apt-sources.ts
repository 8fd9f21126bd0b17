/**
 * The Debian mirror this machine already uses, read from its apt sources
 * (one-line `.list` and deb822 `.sources` files), so the throwaway hosts
 * fetch packages from the same place, with no extra network access.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

export interface AptSource {
  uri: string;
  suite: string;
  components: string[];
}

export function readAptSources(etcApt = "/etc/apt"): AptSource[] {
  const files: string[] = [join(etcApt, "sources.list")];
  try {
    for (const f of readdirSync(join(etcApt, "sources.list.d")).sort()) {
      // Only what apt itself reads: `*.list` and `*.sources` (not `.disabled`, `.save`, ...).
      if (f.endsWith(".list") || f.endsWith(".sources")) files.push(join(etcApt, "sources.list.d", f));
    }
  } catch {
    // no sources.list.d
  }
  const out: AptSource[] = [];
  for (const file of files) {
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch {
      continue;
    }
    out.push(...(file.endsWith(".sources") ? parseDeb822(text) : parseOneLine(text)));
  }
  return out;
}

export function parseOneLine(text: string): AptSource[] {
  const out: AptSource[] = [];
  for (const raw of text.split("\n")) {
    const line = raw.replace(/#.*/, "").trim();
    // deb [opts] uri suite comp...
    const m = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)$/.exec(line);
    if (m) out.push({ uri: m[1]!, suite: m[2]!, components: m[3]!.split(/\s+/).filter(Boolean) });
  }
  return out;
}

export function parseDeb822(text: string): AptSource[] {
  const out: AptSource[] = [];
  for (const stanza of text.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    for (const raw of stanza.split("\n")) {
      if (raw.startsWith("#")) continue;
      const m = /^([A-Za-z-]+):\s*(.*)$/.exec(raw);
      if (m) fields.set(m[1]!.toLowerCase(), m[2]!.trim());
    }
    if (!(fields.get("types") ?? "").split(/\s+/).includes("deb")) continue;
    if ((fields.get("enabled") ?? "yes").toLowerCase() === "no") continue;
    const components = (fields.get("components") ?? "").split(/\s+/).filter(Boolean);
    for (const uri of (fields.get("uris") ?? "").split(/\s+/).filter(Boolean)) {
      for (const suite of (fields.get("suites") ?? "").split(/\s+/).filter(Boolean)) {
        out.push({ uri, suite, components });
      }
    }
  }
  return out;
}

/** Sources that belong to `suite` itself: `bookworm`, `bookworm-updates`, `bookworm-security`, `bookworm/updates`. */
export function sourcesForSuite(sources: AptSource[], suite: string): AptSource[] {
  return sources.filter((s) => s.suite === suite || s.suite.startsWith(`${suite}-`) || s.suite.startsWith(`${suite}/`));
}

/**
 * HOST_TESTBED_DEBIAN_MIRROR: the Debian mirror to use when this machine's
 * apt sources have none (an Ubuntu CI runner, say).
 */
export function mirrorOverride(): string | null {
  const v = process.env.HOST_TESTBED_DEBIAN_MIRROR?.trim();
  if (!v) return null;
  if (!/^https?:\/\/[^\s/]+(\/\S*)?$/.test(v)) throw new Error(`HOST_TESTBED_DEBIAN_MIRROR=${JSON.stringify(v)} is not an http(s) URL of a Debian mirror`);
  return v.replace(/\/+$/, "");
}

/** This machine's release codename (VERSION_CODENAME in /etc/os-release), or null. */
export function machineCodename(osRelease = "/etc/os-release"): string | null {
  try {
    const m = /^VERSION_CODENAME=["']?([a-z0-9-]+)["']?$/m.exec(readFileSync(osRelease, "utf8"));
    return m?.[1] ?? null;
  } catch {
    return null;
  }
}

/**
 * The machine's own release's sources (`bookworm`, `bookworm-updates`,
 * `bookworm-security` on a bookworm machine): the template for another
 * release's sources on the same mirrors.
 */
function machineReleaseSources(sources: AptSource[], codename: string | null): { codename: string; sources: AptSource[] } | null {
  const own = codename ? sources.find((s) => s.suite === codename) : undefined;
  if (!own) return null;
  return { codename: own.suite, sources: sourcesForSuite(sources, own.suite) };
}

function noMirror(suite: string): Error {
  return new Error(
    `no Debian mirror for '${suite}' in /etc/apt/sources.list or /etc/apt/sources.list.d/ ` +
      "(neither a source for that suite nor one for this machine's own release, VERSION_CODENAME in /etc/os-release): " +
      "add your Debian mirror to the apt sources, or set HOST_TESTBED_DEBIAN_MIRROR to its URL",
  );
}

/**
 * The mirror debootstrap should use: the one serving the bare suite, else
 * the one serving this machine's own release (the same archive has every
 * release).
 */
export function debianMirror(suite: string, sources = readAptSources(), codename = machineCodename()): string {
  const override = mirrorOverride();
  if (override) return override;
  const main = sources.find((s) => s.suite === suite) ?? machineReleaseSources(sources, codename)?.sources[0];
  if (!main) throw noMirror(suite);
  return main.uri.replace(/\/+$/, "");
}

/**
 * A sources.list for the throwaway host: the same mirrors, same suites.
 * For a release this machine has no sources for, its own release's sources
 * with the codename swapped (`bookworm-security` becomes `trixie-security`).
 */
export function sourcesListFor(suite: string, sources = readAptSources(), codename = machineCodename()): string {
  let mine = sourcesForSuite(sources, suite);
  const override = mirrorOverride();
  if (override && mine.length === 0) mine = ["", "-updates"].map((tail) => ({ uri: override, suite: suite + tail, components: ["main"] }));
  if (mine.length === 0) {
    const own = machineReleaseSources(sources, codename);
    if (!own) throw noMirror(suite);
    mine = own.sources.map((s) => ({ ...s, suite: suite + s.suite.slice(own.codename.length).replace(/^\/updates$/, "-security") }));
  }
  const lines = mine.map((s) => `deb ${s.uri} ${s.suite} ${(s.components.length ? s.components : ["main"]).join(" ")}`);
  return `${[...new Set(lines)].join("\n")}\n`;
}
