#!/usr/bin/env node
/**
 * host-testbed: throwaway Debian hosts for trying the bootstrap by hand.
 *
 *   host-testbed up [--name NAME] [--suite bookworm|trixie] [--arch amd64|arm64]
 *                                         build/reuse the rootfs, boot a host, print its name
 *   host-testbed exec [NAME] -- CMD...    run CMD inside the host as root
 *   host-testbed list                     hosts and whether they run
 *   host-testbed down [NAME] | --all      stop, release loop devices and mounts, delete
 */
import { ThrowawayHost } from "./host.js";

const USAGE = `usage:
  host-testbed up [--name NAME] [--suite bookworm|trixie] [--arch amd64|arm64]
  host-testbed exec [NAME] -- CMD [ARG...]
  host-testbed list
  host-testbed down [NAME] | down --all`;

const say = (line: string) => process.stderr.write(`${line}\n`);

/** The one host meant when no name is given: fine only when there is exactly one. */
function pickHost(name: string | undefined): string {
  if (name) return name;
  const all = ThrowawayHost.list();
  if (all.length === 1) return all[0]!;
  throw new Error(all.length === 0 ? "no hosts; start one with: host-testbed up" : `several hosts (${all.join(", ")}); name one`);
}

function option(args: string[], flag: string): string | undefined {
  const i = args.indexOf(flag);
  if (i < 0) return undefined;
  const v = args[i + 1];
  if (!v || v.startsWith("--")) throw new Error(`${flag} needs a value`);
  return v;
}

async function cmdUp(args: string[]): Promise<number> {
  const name = option(args, "--name");
  const suite = option(args, "--suite");
  const arch = option(args, "--arch");
  if (arch !== undefined && arch !== "amd64" && arch !== "arm64") throw new Error(`--arch ${arch}: use amd64 or arm64`);
  const host = await ThrowawayHost.up({ name, log: say, rootfs: { ...(suite ? { suite } : {}), ...(arch ? { arch } : {}) } });
  process.stdout.write(`${host.name}\n`);
  say(`run commands:  host-testbed exec ${host.name} -- bash`);
  say(`take it down:  host-testbed down ${host.name}`);
  return 0;
}

async function cmdExec(args: string[]): Promise<number> {
  const dash = args.indexOf("--");
  if (dash < 0 || dash === args.length - 1) throw new Error("exec needs -- CMD");
  const host = ThrowawayHost.attach(pickHost(args[dash - 1]));
  const cmd = args.slice(dash + 1);
  // Interactive: inherit the terminal, so `exec -- bash` works.
  const { spawnSync } = await import("node:child_process");
  const [bin, ...rest] = host.execArgv(cmd, { env: { TERM: process.env.TERM ?? "dumb" } });
  const r = spawnSync(bin!, rest, { stdio: "inherit" });
  return r.status ?? 1;
}

async function cmdDown(args: string[]): Promise<number> {
  const names = args.includes("--all") ? ThrowawayHost.list() : [pickHost(args[0])];
  for (const name of names) await ThrowawayHost.attach(name, say).down();
  if (names.length === 0) say("no hosts");
  return 0;
}

function cmdList(): number {
  for (const name of ThrowawayHost.list()) {
    const h = ThrowawayHost.attach(name);
    process.stdout.write(`${name}\t${h.isRunning() ? "running" : "stopped"}\t${h.rootfs}\n`);
  }
  return 0;
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...args] = argv;
  switch (cmd) {
    case "up":
      return cmdUp(args);
    case "exec":
      return cmdExec(args);
    case "down":
      return cmdDown(args);
    case "list":
      return cmdList();
    default:
      process.stderr.write(`${USAGE}\n`);
      return cmd === "--help" || cmd === "-h" ? 0 : 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    say(`error: ${e instanceof Error ? e.message : String(e)}`);
    process.exit(1);
  },
);
