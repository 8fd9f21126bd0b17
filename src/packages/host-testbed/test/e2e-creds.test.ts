/**
 * End-to-end, every boot after the first (issue 11), on one throwaway host
 * behind a fault proxy in front of the hub (FaultBed): the stub exchanges the
 * user-data token once for the host credential; a replay of the token is
 * refused and shows in the host's credential record; a reboot after the
 * token expired exits 0 with the host healthy (timed: the reboot with
 * nothing to do, stub start to exit); bootstrap.py rotates the credential
 * when the hub's time has come; with the hub down at boot the stub runs the
 * local bootstrap.py in reconcile mode, exits 0, and the run's events reach
 * the hub once it is back; a revoked credential (the hub's stop) still boots;
 * re-provisioned with the exchange's answer reset in transit once, the stub
 * asks again with the credential it chose and the hub logs a retry, not a
 * replay (the idempotent exchange).
 *
 * Cost: one cold bootstrap (about a minute here) and a handful of re-runs and
 * reboots. Needs root like e2e.test.ts; SKIP_E2E=1 skips it and says why.
 */
import { renderStub, stubOptionsFor } from "@cocalc/project-host-bootstrap";
import { type HostCredentialRecord, revokeHostCredentials } from "@cocalc/server";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { expectServiceHealthy, expectTokenNowhere } from "../src/end-state.js";
import { FaultBed, type FaultRun } from "../src/faults/bed.js";
import { ThrowawayHost } from "../src/host.js";
import { whyNotSupported } from "../src/machine.js";
import { e2eTarget } from "../src/targets.js";
import type { ProvisionedTestHost } from "../src/testbed.js";

const target = e2eTarget();
const why = whyNotSupported();
const skip = process.env.SKIP_E2E === "1";
const log = (line: string) => process.stderr.write(`[e2e-creds] ${line}\n`);
const timings: Record<string, number | number[]> = {};
if (skip) log(`skipping the credentials end-to-end suite: SKIP_E2E=1${why ? ` (and ${why})` : ""}`);

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

describe.skipIf(skip)(`every boot and the host credential on a throwaway host (${target.suite})`, () => {
  let fb: FaultBed;
  let host: ThrowawayHost;
  let prov: ProvisionedTestHost;
  let cold: FaultRun;
  const direct = (u: string) => u.replace(fb.hubProxy.url, prov.hub.url);
  const credentialFile = () => `${prov.config.bootstrap_dir}/host-credential`;
  const credential = () => host.readFile(credentialFile()).trim();
  const record = async () => (await (await fetch(direct(`${prov.config.hub.url}/credentials`))).json()) as HostCredentialRecord;
  const lines = (r: FaultRun) => r.run.stdout + r.run.stderr;

  /** The latest run the hub knows for this host, once its state is final. */
  async function hubRun(): Promise<{ run_id: string | null; state: string }> {
    const s = await fb.settledStatus(prov, 30_000);
    return { run_id: s.run_id, state: s.state };
  }

  beforeAll(async () => {
    if (why) throw new Error(`${why}. Run the suite as root, or set SKIP_E2E=1 to skip it (reported as skipped).`);
    fb = await FaultBed.start({ log, arch: target.arch, os: target.os });
    host = await ThrowawayHost.up({ log, rootfs: { suite: target.suite, arch: target.arch } });
    const p = await fb.provision(host);
    // One retry: the hub-down boot then waits seconds, not half a minute, before it reconciles.
    prov = { ...p, stub: renderStub({ ...stubOptionsFor(p.config, { token: p.token }), downloadRetries: 1 }) };
    cold = await fb.run(host, prov, { log: (l) => process.stderr.write(`[cold] ${l}`) });
    log(`cold: exit ${cold.run.code} in ${(cold.run.wallMs / 1000).toFixed(1)} s`);
  }, 900_000);

  afterAll(async () => {
    await host?.down().catch((e: unknown) => log(`down: ${String(e)}`));
    await fb?.close();
    log(`timings: ${JSON.stringify(timings)}`);
  });

  it("first contact: the token is exchanged for the host credential (0600), its file deleted; nothing leaks", async () => {
    expect(cold.run.code, lines(cold)).toBe(0);
    expect(lines(cold)).toContain("the bootstrap token is spent and deleted");
    expect((await hubRun()).state).toBe("done");
    expect(host.readFile(`${prov.config.bootstrap_dir}/bootstrap-token.exchanged`)).toMatch(/^[0-9a-f]{64}\n$/);
    await expectTokenNowhere({ host, prov, run: cold.run, argvHits: [], status: await fb.status(prov) });
    const r = await record();
    expect(r.tokens).toHaveLength(1);
    expect(r.tokens[0]!.exchanged_at).not.toBeNull();
    expect(r.credentials.filter((c) => c.revoked_at === null)).toHaveLength(1);
    expect(r.credentials[0]!.last_used_at).not.toBeNull(); // events and secrets came with it
  });

  it("the user-data token replayed after the exchange: refused everywhere (401 token_already_exchanged) and visible to the operator", async () => {
    const base = direct(prov.config.hub.url);
    const auth = { authorization: `Bearer ${prov.token}` };
    const exchange = await fetch(`${base}/credential`, { method: "POST", headers: auth });
    expect(exchange.status).toBe(401);
    expect(((await exchange.json()) as { code: string }).code).toBe("token_already_exchanged");
    const config = await fetch(`${base}/config`, { headers: auth });
    expect(config.status).toBe(401);
    const r = await record();
    expect(r.replays).toBeGreaterThanOrEqual(1);
    expect(r.log.map((e) => e.kind)).toContain("exchange");
    expect(r.log[0]).toMatchObject({ kind: "replay" });
  });

  it("reboot after the token expired: the stub exits 0, the host is healthy, nothing downloaded (timed)", async () => {
    await prov.hub.db.query("UPDATE bootstrap_tokens SET expires_at = now() - interval '1 day' WHERE host_id = $1", [prov.hostId]);
    const times: number[] = [];
    for (let i = 0; i < 3; i++) {
      await host.reboot();
      await expectServiceHealthy(host, prov, 60_000);
      const artifactsBefore = fb.art.log.length;
      const r = await fb.run(host, prov);
      expect(r.run.code, lines(r)).toBe(0);
      expect(lines(r)).not.toContain("reconcil"); // the hub is up: a normal run with the credential
      expect(fb.art.log.slice(artifactsBefore), "artifact requests on a boot with nothing to do").toEqual([]);
      expect(await hubRun()).toEqual({ run_id: r.runId, state: "done" });
      times.push(r.run.wallMs / 1000);
    }
    timings.reboot_nothing_to_do_s = times;
    timings.reboot_nothing_to_do_median_s = median(times);
    log(`reboot with nothing to do, stub start to exit: ${times.map((t) => t.toFixed(2)).join(", ")} s (median ${median(times).toFixed(2)} s)`);
  });

  it("rotation when the hub's time has come: bootstrap.py swaps the credential; the old one is refused once the new one is used", async () => {
    const old = credential();
    // The hub's schedule says: due (a minute ago), and so does the host's copy of it.
    const [due] = await prov.hub.db.query<{ t: Date }>(
      "UPDATE bootstrap_credentials SET rotate_after = now() - interval '1 minute' WHERE host_id = $1 AND revoked_at IS NULL RETURNING rotate_after AS t",
      [prov.hostId],
    );
    host.writeFile(`${credentialFile()}.rotate-after`, `${due!.t.toISOString()}\n`, { mode: 0o600, owner: host.user });
    const r = await fb.run(host, prov);
    expect(r.run.code, lines(r)).toBe(0);
    const now = credential();
    expect(now).not.toBe(old);
    expect(now).toMatch(/^cchc_/);
    expect(r.records.some((x) => /rotated this host's credential/.test(String(x.message)))).toBe(true);
    expect(await hubRun()).toEqual({ run_id: r.runId, state: "done" }); // events went with the new one
    const stale = await fetch(direct(`${prov.config.hub.url}/config`), { headers: { authorization: `Bearer ${old}` } });
    expect(stale.status).toBe(401);
    expect((await record()).log.map((e) => e.kind)).toContain("rotate");
  });

  it("hub down at boot: reconcile with the local bootstrap.py, exit 0; the run's events reach the hub after it returns", async () => {
    await fb.hubProxy.refuse();
    let r: FaultRun;
    try {
      await host.reboot();
      r = await fb.run(host, prov);
      expect(r.run.code, lines(r)).toBe(0);
      expect(lines(r)).toMatch(/did not answer; reconciling this host with its local bootstrap.py and config/);
      expect(r.records.some((x) => /reconcile mode/.test(String(x.message)))).toBe(true);
      await expectServiceHealthy(host, prov, 60_000);
      expect((await fb.status(prov)).run_id).not.toBe(r.runId); // the hub has not heard of it yet
      timings.hub_down_boot_s = r.run.wallMs / 1000;
    } finally {
      await fb.hubProxy.accept();
    }
    // the detached send-events delivers it (its backoff is at most 30 s)
    const deadline = Date.now() + 120_000;
    let seen = await fb.status(prov);
    while (seen.run_id !== r.runId && Date.now() < deadline) {
      await new Promise((res) => setTimeout(res, 1000));
      seen = await fb.status(prov);
    }
    expect(seen.run_id).toBe(r.runId);
    expect((await hubRun()).state).toBe("done");
  });

  it("credential revoked by the hub (stop/delete): the boot still exits 0, in reconcile mode", async () => {
    expect(await revokeHostCredentials(prov.hub.db, prov.hostId, { why: "host stopped" })).toMatchObject({ credentials: 1 });
    const r = await fb.run(host, prov);
    expect(r.run.code, lines(r)).toBe(0);
    expect(lines(r)).toMatch(/the hub refused this host's credential \(HTTP 401, credential_revoked\); reconciling/);
    await expectServiceHealthy(host, prov);
  });

  it("re-provisioned, the exchange's answer reset in transit once: the stub asks again with the credential it chose; a retry, not a replay", async () => {
    const variant = { parallel: true, artifactUrl: fb.art.url, publicUrl: fb.hubProxy.url };
    const n = await fb.bed.reprovision(prov, variant);
    const p2: ProvisionedTestHost = {
      ...n,
      pageUrl: direct(n.pageUrl),
      statusUrl: direct(n.statusUrl),
      stub: renderStub({ ...stubOptionsFor(n.config, { token: n.token }), downloadRetries: 1 }),
    };
    const since = Date.now() - 1000;
    const label = "exchange answer lost";
    const remove = fb.hubProxy.add({ kind: "reset", match: (q) => q.method === "POST" && /\/credential$/.test(q.path), times: 1, afterBytes: 8, label });
    let r: FaultRun;
    try {
      r = await fb.run(host, p2);
    } finally {
      remove();
    }
    expect(fb.hubProxy.fired(label)).toBe(1);
    expect(r.run.code, lines(r)).toBe(0);
    expect(lines(r)).toContain("no answer to the exchange; asking again with the same credential");
    expect(lines(r)).toContain("the bootstrap token is spent and deleted");
    const chosen = credential();
    expect(chosen).toMatch(/^cchc_[A-Za-z0-9_-]{43}$/);
    const ok = await fetch(direct(`${p2.config.hub.url}/config`), { headers: { authorization: `Bearer ${chosen}` } });
    expect(ok.status).toBe(200);
    const fresh = (await record()).log.filter((e) => Date.parse(e.at) >= since).map((e) => e.kind);
    expect(fresh).toContain("retry");
    expect(fresh).not.toContain("replay");
    expect(fresh.filter((k) => k === "exchange")).toHaveLength(1);
    expect((await fb.settledStatus(p2, 30_000)).state).toBe("done");
    await expectServiceHealthy(host, p2);
    log(`lost exchange answer: exit ${r.run.code} in ${(r.run.wallMs / 1000).toFixed(1)} s; log since: ${fresh.join(", ")}`);
  });
});
