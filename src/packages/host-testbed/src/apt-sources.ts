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

const FALLBACK_MIRROR = "http://deb.debian.org/debian";

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

/** The mirror debootstrap should use: the one serving the bare suite. */
export function debianMirror(suite: string, sources = readAptSources()): string {
  const main = sources.find((s) => s.suite === suite);
  return (main?.uri ?? FALLBACK_MIRROR).replace(/\/+$/, "");
}

/** A sources.list for the throwaway host: the same mirrors, same suites. */
export function sourcesListFor(suite: string, sources = readAptSources()): string {
  let mine = sourcesForSuite(sources, suite);
  if (mine.length === 0) mine = [{ uri: debianMirror(suite, sources), suite, components: ["main"] }];
  const lines = mine.map((s) => `deb ${s.uri} ${s.suite} ${(s.components.length ? s.components : ["main"]).join(" ")}`);
  return `${[...new Set(lines)].join("\n")}\n`;
}
