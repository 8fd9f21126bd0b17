/**
 * The end state of a finished bootstrap, checked on a real host: the checks
 * the end-to-end suite makes on its throwaway hosts and `bootstrap-local`
 * makes on the machine it runs on. A host is anything that can run a
 * command as root or as a user and read its files (`HostView`):
 * `ThrowawayHost`, or `LocalHost` in bootstrap-local.ts.
 */
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { type BootstrapConfig, runTimings } from "@cocalc/project-host-bootstrap";
import type { HostStatus } from "@cocalc/server";
import { expect } from "./expect.js";
import type { ExecOptions } from "./host.js";
import type { RunResult } from "./proc.js";
import type { BootstrapRun, ProvisionedTestHost } from "./testbed.js";

export interface HostView {
  readonly name: string;
  exec(cmd: readonly string[], opts?: ExecOptions): Promise<RunResult>;
  /** Shell one-liner; returns stdout (throws on failure). */
  sh(script: string, opts?: ExecOptions): Promise<string>;
  /** This machine's path of a path on the host. */
  path(inside: string): string;
  readFile(inside: string): string;
  lookupUser(name: string): { uid: number; gid: number; home: string };
  /** `btrfs ARGS... <mountpoint>` when the host cannot run it itself (see ThrowawayHost.btrfs). */
  btrfs?(args: readonly string[], mountpoint: string, opts?: ExecOptions): Promise<RunResult>;
}

/** A bootstrap run with everything the assertions need afterwards. */
export interface Observed {
  host: HostView;
  prov: ProvisionedTestHost;
  run: BootstrapRun;
  /** Command lines that carried the token while the run went on (masked). */
  argvHits: string[];
  status: HostStatus;
}

export const ARTIFACTS = ["project_host", "project", "tools"] as const;

export function outputOf(o: Observed): string {
  return `exit ${o.run.code}\n--- stdout (tail)\n${o.run.stdout.slice(-4000)}\n--- stderr (tail)\n${o.run.stderr.slice(-4000)}`;
}

/**
 * An env file read as upstream's daemon reads it (UPSTREAM.md 13): KEY=VALUE
 * lines, `#` lines skipped, one pair of surrounding quotes stripped.
 */
export function parseEnvFile(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#") || !line.includes("=")) continue;
    const at = line.indexOf("=");
    let value = line.slice(at + 1).trim();
    if (value.length >= 2 && value[0] === value[value.length - 1] && (value[0] === '"' || value[0] === "'")) value = value.slice(1, -1);
    out[line.slice(0, at).trim()] = value;
  }
  return out;
}

/** `btrfs ARGS... <mountpoint>` on the host, through the host's own route when it has one (emulated hosts). */
export function btrfsOn(host: HostView, args: readonly string[], mountpoint: string, opts: ExecOptions = {}): Promise<RunResult> {
  return host.btrfs ? host.btrfs(args, mountpoint, opts) : host.exec(["btrfs", ...args, mountpoint], opts);
}

/** The environment systemd gives a unit with `EnvironmentFile=<path>` (a transient unit that prints it). */
export async function systemdEnvironment(host: HostView, path: string): Promise<Record<string, string>> {
  const out = await host.exec(["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "-p", `EnvironmentFile=${path}`, "env", "-0"]);
  const env: Record<string, string> = {};
  for (const entry of out.stdout.split("\0")) {
    const at = entry.indexOf("=");
    if (at > 0) env[entry.slice(0, at)] = entry.slice(at + 1);
  }
  return env;
}

/** Everything the issue lists for a finished bootstrap; shared by the parallel and serial runs. */
export async function expectBootstrappedHost(o: Observed): Promise<void> {
  const { host, prov } = o;
  const c: BootstrapConfig = prov.config;
  const user = host.lookupUser(c.bootstrap_user);

  // exit 0
  expect(o.run.code, outputOf(o)).toBe(0);

  // /btrfs: btrfs, the data subvolume (the user's) with tmp 1777 and secrets 0700, quota
  expect((await host.sh("findmnt -n -o FSTYPE /btrfs")).trim()).toBe("btrfs");
  expect((await btrfsOn(host, ["subvolume", "list"], "/btrfs")).stdout).toMatch(/ path data$/m);
  const qgroups = await btrfsOn(host, ["qgroup", "show"], "/btrfs", { allowFailure: true });
  expect(qgroups.code, `quota not enabled: ${qgroups.stderr}`).toBe(0);
  expect((await host.sh("stat -c '%a %U' /btrfs/data /btrfs/data/tmp /btrfs/data/secrets")).trim().split("\n")).toEqual(
    ["755", "1777", "700"].map((m) => `${m} ${c.bootstrap_user}`),
  );
  // the conat password where upstream's daemon reads it, 0600
  expect((await host.sh("stat -c '%a %U' /btrfs/data/secrets/conat-password")).trim()).toBe(`600 ${c.bootstrap_user}`);
  // the grow helper where the connector and the daemon call it, run at boot before the daemon
  expect((await host.sh("stat -c '%a %U' /usr/local/sbin/cocalc-grow-btrfs")).trim()).toBe("755 root");
  expect((await host.sh("systemctl is-enabled cocalc-grow-btrfs.service")).trim()).toBe("enabled");
  expect((await host.sh("systemctl show -p After --value cocalc-project-host")).split(/\s+/)).toContain("cocalc-grow-btrfs.service");
  // upstream's done markers, beside ours
  // (through the host: /btrfs is mounted in its mount namespace, not visible in its rootfs from here)
  for (const marker of ["/btrfs/data/.bootstrap_done", "/var/lib/cocalc/.bootstrap_done"]) {
    expect(await host.sh(`cat ${marker}`), marker).toBe(host.readFile(`${c.bootstrap_dir}/.bootstrap_done`));
  }
  // rootless podman: subordinate ids, storage on /btrfs for root and the user
  for (const f of ["/etc/subuid", "/etc/subgid"]) expect(host.readFile(f)).toMatch(new RegExp(`^${c.bootstrap_user}:\\d+:65536$`, "m"));
  expect(host.readFile("/etc/containers/storage.conf")).toContain('graphroot = "/btrfs/data/containers/root/storage"');
  expect(host.readFile(`${c.home}/.config/containers/storage.conf`)).toContain(`graphroot = "/btrfs/data/containers/rootless/${c.bootstrap_user}/storage"`);
  expect(host.readFile("/etc/sysctl.d/60-cocalc-userns.conf")).toBe("kernel.unprivileged_userns_clone = 1\n");
  // time: chrony enabled with upstream's settings, timesyncd not running
  expect(host.readFile("/etc/chrony/chrony.conf")).toMatch(/^makestep 1\.0 -1$/m);
  expect((await host.sh("systemctl is-enabled chrony.service")).trim()).toBe("enabled");
  expect((await host.exec(["systemctl", "is-active", "systemd-timesyncd.service"], { allowFailure: true })).stdout.trim()).not.toBe("active");

  // exactly one tagged, nofail fstab line for the loop image
  const fstab = host
    .readFile("/etc/fstab")
    .split("\n")
    .filter((l) => /\s\/btrfs\s/.test(l) && !l.trimStart().startsWith("#"));
  expect(fstab).toHaveLength(1);
  const [src, mnt, type, options] = fstab[0]!.trim().split(/\s+/);
  expect([src, mnt, type]).toEqual([c.btrfs.image_path, "/btrfs", "btrfs"]);
  expect(options!.split(",")).toEqual(expect.arrayContaining(["nofail", "loop", "x-cocalc-bootstrap"]));

  // the env file: content, owner root:<user's group>, mode 0640, no token
  const envPath = host.path("/etc/cocalc/project-host.env");
  const st = statSync(envPath);
  expect((st.mode & 0o777).toString(8)).toBe("640");
  expect([st.uid, st.gid]).toEqual([0, user.gid]);
  const envText = readFileSync(envPath, "utf8");
  const env = parseEnvFile(envText);
  expect(env).toMatchObject({
    MASTER_CONAT_SERVER: c.conat_urls[0],
    PROJECT_HOST_ID: c.host.id,
    PROJECT_HOST_NAME: c.host.name,
    DATA: "/btrfs/data",
    COCALC_DATA: "/btrfs/data",
    TMPDIR: "/btrfs/data/tmp",
    COCALC_SYNC_PROJECTS: "/btrfs/project-[project_id]/.local/share/cocalc/persist",
    COCALC_PROJECT_TOOLS: `${c.bootstrap_root}/bundles/tools/current`,
    PORT: String(c.daemon.port),
    ...c.env,
  });
  expect(envText).not.toContain(prov.token);
  // systemd reads every value exactly as the daemon's own parser does (the stand-in daemon checks
  // this too, and refuses to start otherwise)
  const systemd = await systemdEnvironment(host, "/etc/cocalc/project-host.env");
  for (const [key, value] of Object.entries(env)) expect(systemd[key], key).toBe(value);

  // the bundles: bundles/<artifact>/<version> with the expected files, current -> version
  for (const a of ARTIFACTS) {
    const spec = c.artifacts[a];
    const dir = `${c.bootstrap_root}/bundles/${a}`;
    expect((await host.sh(`readlink ${dir}/current`)).trim()).toBe(spec.version);
    for (const f of spec.expected_files) expect(statSync(host.path(`${dir}/${spec.version}/${f}`)).isFile()).toBe(true);
    for (const f of spec.executables) expect(statSync(host.path(`${dir}/${spec.version}/${f}`)).mode & 0o111).not.toBe(0);
    expect((await host.sh(`stat -c %U ${dir}/${spec.version}`)).trim()).toBe(c.bootstrap_user);
  }

  // node in nvm's layout runs, as the user
  const node = `${c.home}/.nvm/versions/node/v${c.node.version}/bin/node`;
  expect((await host.sh(`${node} --version`, { user: c.bootstrap_user })).trim()).toBe(`v${c.node.version}`);
  expect((await host.sh(`${node} -e 'console.log(6*7)'`, { user: c.bootstrap_user })).trim()).toBe("42");

  // the unit is active, runs as the user, and the health URL answers (from this machine: shared loopback)
  await expectServiceHealthy(host, prov);
  expect((await host.sh("systemctl show -p User --value cocalc-project-host")).trim()).toBe(c.bootstrap_user);
  expect((await host.sh("systemctl is-enabled cocalc-project-host")).trim()).toBe("enabled");

  // the hub: done, 100 %, every step with its timing
  const s = o.status;
  expect(s.state, JSON.stringify(s.failure)).toBe("done");
  expect(s.percent).toBe(100);
  expect(s.steps.length).toBeGreaterThanOrEqual(10);
  for (const step of s.steps) {
    expect(["changed", "unchanged"], `${step.name}: ${step.state} ${step.message}`).toContain(step.state);
    expect(step.duration_s, step.name).toEqual(expect.any(Number));
    expect(step.started_ts, step.name).toEqual(expect.any(Number));
  }

  // the log is JSON lines; the token is in no log, no file we wrote and no argv
  const records = readJsonLines(host, `${c.bootstrap_root}/logs/bootstrap.log`);
  expect(records.length).toBeGreaterThan(20);
  for (const r of records) expect(r).toMatchObject({ ts: expect.any(String), event: expect.any(String), message: expect.any(String) });
  await expectTokenNowhere(o);

  // the token was exchanged (single use) and its file deleted; the host credential is the user's, 0600
  expect(existsSync(host.path(`${c.bootstrap_dir}/bootstrap-token`)), "the spent bootstrap token file").toBe(false);
  const cred = statSync(host.path(`${c.bootstrap_dir}/host-credential`));
  expect([(cred.mode & 0o777).toString(8), cred.uid]).toEqual(["600", user.uid]);
}

export async function expectServiceHealthy(host: HostView, prov: ProvisionedTestHost, timeoutMs = 30_000): Promise<{ pid: number; version: string }> {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  while (Date.now() < deadline) {
    const active = (await host.exec(["systemctl", "is-active", "cocalc-project-host"], { allowFailure: true })).stdout.trim();
    try {
      const r = await fetch(prov.healthUrl);
      if (active === "active" && r.status === 200) return (await r.json()) as { pid: number; version: string };
      last = `unit ${active}, health ${r.status}`;
    } catch (e) {
      last = `unit ${active}, health ${(e as Error).message}`;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`${prov.hostName}: service not healthy after ${timeoutMs} ms (${last})`);
}

export function readJsonLines(host: HostView, path: string): Record<string, unknown>[] {
  const lines = host
    .readFile(path)
    .split("\n")
    .filter((l) => l.trim() !== "");
  return lines.map((l, i) => {
    try {
      return JSON.parse(l) as Record<string, unknown>;
    } catch {
      throw new Error(`${path}:${i + 1} is not JSON: ${l.slice(0, 200)}`);
    }
  });
}

export async function expectTokenNowhere(o: Observed): Promise<void> {
  const c = o.prov.config;
  expect(o.argvHits, "the token appeared in a command line").toEqual([]);
  expect(o.run.stdout + o.run.stderr).not.toContain(o.prov.token);
  // Every file under the bootstrap root except the token file, plus the journal.
  const r = await o.host.exec(
    ["grep", "-rlF", "--exclude=bootstrap-token", "-e", o.prov.token, c.bootstrap_root, "/etc/cocalc", "/etc/systemd/system", "/var/log"],
    { allowFailure: true },
  );
  expect(r.code, `token found in: ${r.stdout}`).toBe(1); // grep: 1 = no match
  const journal = await o.host.exec(["journalctl", "--no-pager", "-o", "cat"], { allowFailure: true });
  expect(journal.stdout).not.toContain(o.prov.token);
  // The host credential the token was exchanged for: only in its own file.
  const credentialFile = `${c.bootstrap_dir}/host-credential`;
  if (existsSync(o.host.path(credentialFile))) {
    const credential = o.host.readFile(credentialFile).trim();
    expect(credential).toMatch(/^cchc_[A-Za-z0-9_-]{43}$/);
    expect(o.run.stdout + o.run.stderr).not.toContain(credential);
    const c2 = await o.host.exec(
      ["grep", "-rlF", "--exclude=host-credential", "-e", credential, c.bootstrap_root, "/etc/cocalc", "/etc/systemd/system", "/var/log"],
      { allowFailure: true },
    );
    expect(c2.code, `credential found in: ${c2.stdout}`).toBe(1);
    expect(journal.stdout).not.toContain(credential);
  }
}

/**
 * The lines of the newest run's event spool on the host
 * (`<bootstrap_dir>/events/<run_id>.jsonl`; run ids sort by start time):
 * bootstrap.py's one record of what a run did.
 */
export function newestRunEvents(host: HostView, bootstrapDir: string): string[] {
  const dir = `${bootstrapDir}/events`;
  const newest = readdirSync(host.path(dir))
    .filter((f) => f.endsWith(".jsonl"))
    .sort()
    .pop();
  if (!newest) throw new Error(`${host.name}: no event spool in ${dir}`);
  return host.readFile(`${dir}/${newest}`).split("\n");
}

/** Which daemon process is serving, to prove a re-run did not restart it. */
export interface DaemonIdentity {
  /** PID the health endpoint reports. */
  healthPid: number;
  /** systemd's MainPID of the unit. */
  mainPid: string;
}

export async function daemonIdentity(host: HostView, prov: ProvisionedTestHost): Promise<DaemonIdentity> {
  const health = await expectServiceHealthy(host, prov);
  const mainPid = (await host.sh("systemctl show -p MainPID --value cocalc-project-host")).trim();
  return { healthPid: health.pid, mainPid };
}

/**
 * A re-run of the same stub on a bootstrapped host changed nothing: it
 * succeeded as a new run, fetched nothing (`fetchedPaths`: the artifact
 * server's requests during the re-run), did not restart the daemon, and
 * every step ended `unchanged` with its reason, in the events the hub got
 * and in the host's own spool alike. Normally every step skipped ("satisfied
 * (...); inputs unchanged since ..."); with `stateLost` (state.json was
 * removed) every step applied to be sure and found nothing to change.
 */
export async function expectRerunChangedNothing(
  first: Observed,
  again: Observed,
  before: DaemonIdentity,
  fetchedPaths: string[],
  opts: { stateLost?: boolean } = {},
): Promise<void> {
  const { host, prov } = again;
  expect(again.run.code, outputOf(again)).toBe(0);
  expect(again.status.state).toBe("done");
  expect(again.status.run_id).not.toBe(first.status.run_id);
  // nothing fetched from the artifact server (bundles, Node, SHASUMS)
  expect(fetchedPaths).toEqual([]);
  // the daemon was not restarted
  expect((await host.sh("systemctl show -p MainPID --value cocalc-project-host")).trim()).toBe(before.mainPid);
  expect((await expectServiceHealthy(host, prov)).pid).toBe(before.healthPid);
  // every step unchanged, and its step_end event says why
  const why = opts.stateLost ? /^no record of a successful run \(.+\)$/ : /^satisfied \(.+\); inputs unchanged since /;
  expect(again.status.steps.length).toBeGreaterThanOrEqual(10);
  for (const step of again.status.steps) {
    expect(step.state, `${step.name}: ${step.message}`).toBe("unchanged");
    expect(step.message, step.name).toMatch(why);
  }
  // the host's own record of the run (its event spool) says the same
  const run = runTimings(newestRunEvents(host, prov.config.bootstrap_dir));
  expect(run.run_id).toBe(again.status.run_id);
  expect(run.ok).toBe(true);
  expect(Object.fromEntries(run.steps.map((s) => [s.name, s.outcome]))).toEqual(Object.fromEntries(again.status.steps.map((s) => [s.name, s.state])));
  await expectTokenNowhere(again);
}
