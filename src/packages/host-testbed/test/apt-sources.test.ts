import { describe, expect, it } from "vitest";
import { debianMirror, parseDeb822, parseOneLine, sourcesListFor } from "../src/apt-sources.js";

const DEB822 = `Types: deb
# http://snapshot.example.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.mirror.example.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: https://node.example.org/node_20.x
Suites: nodistro
Components: main
`;

describe("apt sources", () => {
  it("reads deb822 stanzas, one source per URI and suite", () => {
    const s = parseDeb822(DEB822);
    expect(s.map((x) => `${x.uri} ${x.suite}`)).toEqual([
      "http://mirror.example.org/debian bookworm",
      "http://mirror.example.org/debian bookworm-updates",
      "http://security.mirror.example.org/debian-security bookworm-security",
      "https://node.example.org/node_20.x nodistro",
    ]);
  });

  it("reads one-line sources with options and comments", () => {
    const s = parseOneLine("# x\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib # c\ndeb-src http://x y z\n");
    expect(s).toEqual([{ uri: "http://mirror.example/debian", suite: "bookworm", components: ["main", "contrib"] }]);
  });

  it("picks the mirror of the bare suite and keeps only that suite's sources for the host", () => {
    const s = parseDeb822(DEB822);
    expect(debianMirror("bookworm", s, "bookworm")).toBe("http://mirror.example.org/debian");
    expect(sourcesListFor("bookworm", s, "bookworm")).toBe(
      "deb http://mirror.example.org/debian bookworm main\n" +
        "deb http://mirror.example.org/debian bookworm-updates main\n" +
        "deb http://security.mirror.example.org/debian-security bookworm-security main\n",
    );
  });

  it("another release: this machine's release's mirrors with the codename swapped", () => {
    const s = parseDeb822(DEB822);
    expect(debianMirror("trixie", s, "bookworm")).toBe("http://mirror.example.org/debian");
    expect(sourcesListFor("trixie", s, "bookworm")).toBe(
      "deb http://mirror.example.org/debian trixie main\n" +
        "deb http://mirror.example.org/debian trixie-updates main\n" +
        "deb http://security.mirror.example.org/debian-security trixie-security main\n",
    );
    // old-style security suite
    const old = parseOneLine("deb http://mirror.example.org/debian buster main\ndeb http://security.mirror.example.org/ buster/updates main\n");
    expect(sourcesListFor("bullseye", old, "buster")).toContain("deb http://security.mirror.example.org/ bullseye-security main\n");
  });

  it("no mirror for the suite nor for this machine's release: an error that says where to add one", () => {
    const s = parseDeb822(DEB822);
    // the nodesource-like entry is never taken for a Debian mirror
    expect(() => debianMirror("trixie", s, null)).toThrow(/no Debian mirror for 'trixie'.*sources\.list/);
    expect(() => sourcesListFor("trixie", s, "sid")).toThrow(/add your Debian mirror/);
    expect(() => debianMirror("bookworm", [], "bookworm")).toThrow(/no Debian mirror/);
  });

  it("HOST_TESTBED_DEBIAN_MIRROR names the mirror when the machine's sources have none", () => {
    const saved = process.env.HOST_TESTBED_DEBIAN_MIRROR;
    try {
      process.env.HOST_TESTBED_DEBIAN_MIRROR = "http://mirror.example.org/debian/";
      expect(debianMirror("trixie", [], null)).toBe("http://mirror.example.org/debian");
      expect(sourcesListFor("trixie", [], null)).toBe(
        "deb http://mirror.example.org/debian trixie main\ndeb http://mirror.example.org/debian trixie-updates main\n",
      );
      process.env.HOST_TESTBED_DEBIAN_MIRROR = "mirror.example.org";
      expect(() => debianMirror("trixie", [], null)).toThrow(/HOST_TESTBED_DEBIAN_MIRROR="mirror.example.org" is not an http\(s\) URL/);
    } finally {
      if (saved === undefined) delete process.env.HOST_TESTBED_DEBIAN_MIRROR;
      else process.env.HOST_TESTBED_DEBIAN_MIRROR = saved;
    }
  });
});
