import { describe, expect, it } from "vitest";
import { debianMirror, parseDeb822, parseOneLine, sourcesListFor } from "../src/apt-sources.js";

const DEB822 = `Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
`;

describe("apt sources", () => {
  it("reads deb822 stanzas, one source per URI and suite", () => {
    const s = parseDeb822(DEB822);
    expect(s.map((x) => `${x.uri} ${x.suite}`)).toEqual([
      "http://deb.debian.org/debian bookworm",
      "http://deb.debian.org/debian bookworm-updates",
      "http://deb.debian.org/debian-security bookworm-security",
      "https://deb.nodesource.com/node_20.x nodistro",
    ]);
  });

  it("reads one-line sources with options and comments", () => {
    const s = parseOneLine("# x\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib # c\ndeb-src http://x y z\n");
    expect(s).toEqual([{ uri: "http://mirror.example/debian", suite: "bookworm", components: ["main", "contrib"] }]);
  });

  it("picks the mirror of the bare suite and keeps only that suite's sources for the host", () => {
    const s = parseDeb822(DEB822);
    expect(debianMirror("bookworm", s)).toBe("http://deb.debian.org/debian");
    expect(sourcesListFor("bookworm", s)).toBe(
      "deb http://deb.debian.org/debian bookworm main\n" +
        "deb http://deb.debian.org/debian bookworm-updates main\n" +
        "deb http://deb.debian.org/debian-security bookworm-security main\n",
    );
    expect(debianMirror("trixie", s)).toBe("http://deb.debian.org/debian");
  });
});
