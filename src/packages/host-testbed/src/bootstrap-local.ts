/**
 * `pnpm --filter @cocalc/host-testbed run bootstrap-local [--dry-run]`:
 * the real bootstrap on THIS machine, for clean throwaway VMs such as
 * GitHub's ubuntu-24.04 and ubuntu-24.04-arm runners. As root, it
 *
 *  1. builds the test artifacts for this machine's arch (bundles, and a Node
 *     dist mirror from the `node-linux-<x64|arm64>` npm package), serves
 *     them on 127.0.0.1 and starts the hub on embedded PGlite on 127.0.0.1;
 *  2. provisions a host record for this machine: its hostname, the OS
 *     release from /etc/os-release, the arch from dpkg, the bootstrap user
 *     from $BOOTSTRAP_USER or $SUDO_USER (never root), a sparse btrfs image;
 *  3. runs the hub's stub as root with BOOTSTRAP_USER set, as cloud-init
 *     would, streaming its output; prints `bootstrap.py timings`;
 *  4. checks the end state the end-to-end suite checks (src/end-state.ts),
 *     runs the stub again and checks that the re-run changed nothing.
 *
 * It changes this machine for good (apt packages, /btrfs, /etc/fstab, a
 * systemd unit): use it only on a machine you would throw away.
 *
 * `--dry-run` stops after printing the rendered config (the token
 * redacted) and the stub's length: nothing on the machine changes.
 *
 * Exit codes: 0 all checks passed; 1 the bootstrap or a check failed;
 * 2 this machine or the arguments do not fit (the message says why).
 */
import { spawnSync } from "node:child_process";
import { chmodSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { hostname } from "node:os";
import { parseArgs } from "node:util";
import { ARCHES, type Arch, bootstrapPaths, defaultAptPackages } from "@cocalc/project-host-bootstrap";
import { HOST_NAME_RE, OS_ID_RE, OS_VERSION_RE, USER_RE } from "@cocalc/project-host-bootstrap/contract";
import { watchArgv } from "./argv-watch.js";
import { daemonIdentity, expectBootstrappedHost, expectRerunChangedNothing, type HostView, type Observed } from "./end-state.js";
import { CommandHost, type ExecOptions, minimalEnvArgv } from "./host.js";
import { isRoot } from "./machine.js";
import { type ProvisionedTestHost, STUB_PATH, TEST_APT_PACKAGES, TEST_DISK_SIZE_GB, Testbed } from "./testbed.js";

const USAGE = `usage: bootstrap-local [--dry-run] [--default-apt]

  Bootstrap THIS machine (as root) through a local hub and check the result.
  The bootstrap user is $BOOTSTRAP_USER, else $SUDO_USER; never root.

  --dry-run      stop after printing the rendered config and the stub's length
  --default-apt  install the real hosts' apt packages instead of the tests' small set
`;

const PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const STUB_TIMEOUT_MS = 20 * 60_000;

const say = (line = "") => process.stdout.write(`${line}\n`);
const note = (line: string) => process.stderr.write(`bootstrap-local: ${line}\n`);

/** This machine or the arguments do not fit: exit 2 with the message. */
class UnfitError extends Error {}

/** What the hub must know about this machine. */
interface LocalFacts {
  hostName: string;
  os: { id: string; min_version: string };
  arch: Arch;
  user: string;
  home: string;
}

/** os-release(5) as a dict, quotes removed. */
function parseOsRelease(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line.trim());
    if (m) out[m[1]!] = m[2]!.replace(/^"(.*)"$/, "$1").replace(/^'(.*)'$/, "$1");
  }
  return out;
}

function localOs(): LocalFacts["os"] {
  const release = parseOsRelease(readFileSync("/etc/os-release", "utf8"));
  const id = release.ID ?? "";
  const version = release.VERSION_ID ?? "";
  if (!OS_ID_RE.test(id) || !OS_VERSION_RE.test(version)) {
    throw new UnfitError(`/etc/os-release has ID=${JSON.stringify(id)} VERSION_ID=${JSON.stringify(version)}; the config needs both (e.g. ubuntu 24.04)`);
  }
  // This exact release is the floor: preflight accepts it and nothing older.
  return { id, min_version: version };
}

function localArch(): Arch {
  const r = spawnSync("dpkg", ["--print-architecture"], { encoding: "utf8" });
  const arch = (r.stdout ?? "").trim();
  if (r.status !== 0) throw new UnfitError(`dpkg --print-architecture failed (${r.error?.message ?? r.stderr.trim()}): a Debian or Ubuntu machine is needed`);
  if (!(ARCHES as readonly string[]).includes(arch)) throw new UnfitError(`arch ${arch} is not supported (only ${ARCHES.join(", ")})`);
  return arch as Arch;
}

/** `getent passwd NAME` as uid, gid and home; null when there is no such user. */
function getentUser(name: string): { uid: number; gid: number; home: string } | null {
  const r = spawnSync("getent", ["passwd", name], { encoding: "utf8" });
  const f = (r.stdout ?? "").trim().split(":");
  if (r.status !== 0 || f.length < 6) return null;
  return { uid: Number(f[2]), gid: Number(f[3]), home: f[5]! };
}

function localUser(env: NodeJS.ProcessEnv): { user: string; home: string } {
  const user = env.BOOTSTRAP_USER || env.SUDO_USER || "";
  const from = env.BOOTSTRAP_USER ? "BOOTSTRAP_USER" : "SUDO_USER";
  if (!user) throw new UnfitError("no bootstrap user: set BOOTSTRAP_USER to the non-root user that will run the daemon (or run this through sudo)");
  if (user === "root") throw new UnfitError(`${from}=root: the bootstrap user must not be root; name the non-root user that will run the daemon`);
  if (!USER_RE.test(user)) throw new UnfitError(`${from}=${JSON.stringify(user)} is not a valid user name`);
  const entry = getentUser(user);
  if (!entry) throw new UnfitError(`${from}=${user}: no such user on this machine`);
  if (entry.uid === 0) throw new UnfitError(`${from}=${user} has uid 0; the bootstrap user must not be root`);
  // The hub derives the home from the user name; preflight would refuse a different one.
  if (entry.home !== `/home/${user}`) throw new UnfitError(`${user}'s home is ${entry.home}, not /home/${user} (the only home the hub's config can name)`);
  return { user, home: entry.home };
}

function localHostName(): string {
  const name = hostname().split(".")[0]!.toLowerCase();
  if (!HOST_NAME_RE.test(name)) throw new UnfitError(`this machine's hostname ${JSON.stringify(hostname())} is not a valid host label`);
  return name;
}

/** Everything the host record needs, or an UnfitError naming what does not fit. */
function localFacts(env: NodeJS.ProcessEnv = process.env): LocalFacts {
  const { user, home } = localUser(env);
  return { hostName: localHostName(), os: localOs(), arch: localArch(), user, home };
}

/** This machine as a host for the end-state checks: commands run with a minimal, explicit environment. */
class LocalHost extends CommandHost implements HostView {
  constructor(
    readonly name: string,
    readonly user: string,
  ) {
    super();
  }

  execArgv(cmd: readonly string[], opts: Pick<ExecOptions, "user" | "env"> = {}): string[] {
    const user = opts.user ?? "root";
    const home = user === "root" ? "/root" : (getentUser(user)?.home ?? `/home/${user}`);
    return minimalEnvArgv(cmd, { user, home, path: PATH, env: opts.env });
  }

  path(inside: string): string {
    return inside;
  }

  readFile(inside: string): string {
    return readFileSync(inside, "utf8");
  }

  lookupUser(name: string): { uid: number; gid: number; home: string } {
    const entry = getentUser(name);
    if (!entry) throw new Error(`no user ${name} on this machine`);
    return entry;
  }
}

function redact(text: string, secret: string): string {
  return secret ? text.split(secret).join("<redacted>") : text;
}

function printProvisioned(facts: LocalFacts, prov: ProvisionedTestHost): void {
  say(`This machine: ${facts.hostName}, ${facts.os.id} ${facts.os.min_version}, ${facts.arch}; bootstrap user ${facts.user} (${facts.home})`);
  say(`Progress page: ${prov.pageUrl}`);
  say("--- rendered config (token redacted) ---");
  say(redact(JSON.stringify(prov.config, null, 2), prov.token));
  say("--- end of config ---");
  say(`Stub: ${Buffer.byteLength(prov.stub)} bytes (it carries the token, so it is not shown)`);
}

/** Run the stub as root with BOOTSTRAP_USER, as cloud-init would: a root-only file, never an argument. */
async function runStub(bed: Testbed, host: LocalHost, prov: ProvisionedTestHost, label: string): Promise<Observed> {
  writeFileSync(STUB_PATH, prov.stub, { mode: 0o700 });
  chmodSync(STUB_PATH, 0o700);
  say(`\n=== ${label}: sh ${STUB_PATH} as root, BOOTSTRAP_USER=${host.user}`);
  const watch = watchArgv(prov.token);
  const t0 = Date.now();
  const r = await host.exec(["sh", STUB_PATH], {
    env: { BOOTSTRAP_USER: host.user },
    allowFailure: true,
    timeoutMs: STUB_TIMEOUT_MS,
    onOutput: (chunk) => process.stdout.write(redact(chunk, prov.token)),
  });
  const wallMs = Date.now() - t0;
  const { hits } = watch.stop();
  const status = await bed.settledStatus(prov);
  say(`=== ${label}: exit ${r.code} after ${(wallMs / 1000).toFixed(1)} s; the hub says ${status.state} ${status.percent}%`);
  return { host, prov, run: { ...r, wallMs }, argvHits: hits, status };
}

async function printTimings(host: LocalHost, prov: ProvisionedTestHost): Promise<void> {
  const c = prov.config;
  const paths = bootstrapPaths(c.bootstrap_user, c.home);
  const r = await host.exec(["python3", `${c.bootstrap_dir}/bootstrap.py`, "--config", paths.config_file, "timings"], {
    user: c.bootstrap_user,
    allowFailure: true,
  });
  say("\nbootstrap.py timings:");
  say(redact(r.stdout.trimEnd() || r.stderr.trimEnd(), prov.token));
}

/** A failed run: what the hub recorded (step, message, hint), then exit 1. */
function failedRun(o: Observed, label: string): Error {
  const f = o.status.failure;
  const where = f ? `step ${f.step}: ${f.message}${f.hint ? `\n  hint: ${f.hint}` : ""}` : `the hub says ${o.status.state}`;
  return new Error(`${label} failed (exit ${o.run.code}); ${where}`);
}

/** Run a group of checks; a failure names the group and the check's line. */
async function checking(what: string, checks: () => Promise<void>): Promise<void> {
  try {
    await checks();
    say(`ok: ${what}`);
  } catch (e) {
    const err = e as Error;
    const at = (err.stack ?? "")
      .split("\n")
      .find((l) => l.includes("end-state.ts"))
      ?.trim();
    throw new Error(`check failed: ${what}: ${err.message}${at ? `\n  (${at})` : ""}`);
  }
}

async function bootstrapThisMachine(bed: Testbed, facts: LocalFacts, prov: ProvisionedTestHost): Promise<void> {
  const host = new LocalHost(facts.hostName, facts.user);
  try {
    const first = await runStub(bed, host, prov, "first run");
    await printTimings(host, prov);
    if (first.run.code !== 0) throw failedRun(first, "the first run");
    await checking("the end state after the first run", () => expectBootstrappedHost(first));

    const before = await daemonIdentity(host, prov);
    const requestsBefore = bed.artifactServer.requests.length;
    const again = await runStub(bed, host, prov, "re-run");
    if (again.run.code !== 0) throw failedRun(again, "the re-run");
    const fetched = bed.artifactServer.requests.slice(requestsBefore).map((r) => r.path);
    await checking("the re-run changed nothing", () => expectRerunChangedNothing(first, again, before, fetched));
    say(`\nAll checks passed: first run ${(first.run.wallMs / 1000).toFixed(1)} s, re-run ${(again.run.wallMs / 1000).toFixed(1)} s.`);
  } finally {
    rmSync(STUB_PATH, { force: true }); // it carries the token
  }
}

function parseCommandLine(argv: string[]): { "dry-run"?: boolean; "default-apt"?: boolean; help?: boolean } {
  try {
    return parseArgs({
      args: argv.filter((a) => a !== "--"), // pnpm passes its `--` through
      options: { "dry-run": { type: "boolean" }, "default-apt": { type: "boolean" }, help: { type: "boolean", short: "h" } },
    }).values;
  } catch (e) {
    throw new UnfitError(`${(e as Error).message}\n${USAGE}`);
  }
}

async function main(argv: string[]): Promise<number> {
  const values = parseCommandLine(argv);
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const dryRun = values["dry-run"] ?? false;
  if (process.platform !== "linux") throw new UnfitError(`this needs Linux (this is ${process.platform})`);
  if (!dryRun && !isRoot()) throw new UnfitError("run as root (it installs packages, mounts /btrfs and adds a systemd unit), e.g. with sudo");
  const facts = localFacts();
  note(`building the artifacts for ${facts.arch} (cached), starting the hub on 127.0.0.1 ...`);
  const bed = await Testbed.start({
    log: note,
    arch: facts.arch,
    os: facts.os,
    aptPackages: values["default-apt"] ? [...defaultAptPackages] : TEST_APT_PACKAGES,
  });
  try {
    const prov = await bed.provision({ name: facts.hostName, user: facts.user });
    printProvisioned(facts, prov);
    if (dryRun) {
      say(`Dry run: not running the stub (a sparse ${prov.config.btrfs.image_size_gb} GB btrfs image from a ${TEST_DISK_SIZE_GB} GB disk record).`);
      return 0;
    }
    await bootstrapThisMachine(bed, facts, prov);
    return 0;
  } finally {
    await bed.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: unknown) => {
    const message = e instanceof Error ? e.message : String(e);
    process.stderr.write(`bootstrap-local: ${e instanceof UnfitError ? "error" : "FAILED"}: ${message}\n`);
    process.exit(e instanceof UnfitError ? 2 : 1);
  },
);
