/**
 * Which throwaway hosts a test run boots: the Debian release (E2E_SUITE)
 * and arch (E2E_ARCH). Between them bookworm and trixie bracket Ubuntu
 * 24.04's python3, systemd and apt (trixie has apt 3); arm64 runs emulated
 * on an amd64 machine.
 */
import type { Arch } from "@cocalc/project-host-bootstrap";
import { nativeDebianArch } from "./machine.js";

/** Debian release → the os_release the hub requires of its hosts. */
export const SUITES = { bookworm: "12", trixie: "13" } as const;
export type Suite = keyof typeof SUITES;
const ARCHES: readonly Arch[] = ["amd64", "arm64"];

export interface E2eTarget {
  suite: Suite;
  arch: Arch;
  os: { id: string; min_version: string };
}

export function e2eTarget(env: NodeJS.ProcessEnv = process.env): E2eTarget {
  const suite = env.E2E_SUITE?.trim() || "bookworm";
  if (!(suite in SUITES)) throw new Error(`E2E_SUITE=${JSON.stringify(suite)}: use one of ${Object.keys(SUITES).join(", ")}`);
  const arch = env.E2E_ARCH?.trim() || nativeDebianArch();
  if (!ARCHES.includes(arch as Arch)) throw new Error(`E2E_ARCH=${JSON.stringify(arch)}: use one of ${ARCHES.join(", ")}`);
  return { suite: suite as Suite, arch: arch as Arch, os: { id: "debian", min_version: SUITES[suite as Suite] } };
}
