import { randomUUID } from "node:crypto";
import { EventBatchSchema } from "@cocalc/project-host-bootstrap";
import { describe, expect, it } from "vitest";
import { deriveStatus, statusFingerprint } from "../cloud/bootstrap/status.js";
import type { StoredEvent } from "../cloud/bootstrap/store.js";
import { RunScript } from "./support/fixtures.js";

const hostId = randomUUID();
const received = new Date("2025-06-01T00:00:00Z");

function stored(run: RunScript, at = received): StoredEvent[] {
  return EventBatchSchema.parse({ host_id: hostId, events: run.events }).events.map((event) => ({ event, receivedAt: at }));
}

const opts = (now = received, staleAfterS = 120) => ({ hostId, now, staleAfterS });

describe("status model", () => {
  it("is pending without events", () => {
    const s = deriveStatus([], opts());
    expect(s).toMatchObject({ state: "pending", run_id: null, percent: 0, steps: [], failure: null });
  });

  it("is running with phase, percent, ETA, current steps and every step's timing", () => {
    const run = new RunScript("run-aaaaaaaa", 1000).start();
    run.stepStart("preflight").stepEnd("preflight", "unchanged", 0.5).stepStart("apt").stepStart("node").progress("installing packages", 40);
    const s = deriveStatus(stored(run), opts());
    expect(s.state).toBe("running");
    expect(s.run_id).toBe("run-aaaaaaaa");
    expect(s.phase).toBe("installing packages");
    expect(s.percent).toBe(40);
    expect(s.current_steps).toEqual(["apt", "node"]);
    expect(s.steps.map((st) => [st.name, st.state])).toEqual([
      ["preflight", "unchanged"],
      ["apt", "running"],
      ["download.project_host", "pending"],
      ["node", "running"],
      ["install", "pending"],
      ["services", "pending"],
    ]);
    expect(s.steps[0]).toMatchObject({ started_ts: 1001, ended_ts: 1002, duration_s: 0.5 });
    expect(s.started_ts).toBe(1000);
    // 5 s in for 40 %: about 7.5 s left.
    expect(s.eta_s).toBe(8);
  });

  it("is done at 100 % with the wall time", () => {
    const run = new RunScript().start();
    for (const st of ["preflight", "apt", "download.project_host", "node", "install", "services"]) run.stepStart(st).stepEnd(st, "changed", 1);
    run.end(true, { wall_s: 42 });
    const s = deriveStatus(stored(run), opts());
    expect(s).toMatchObject({ state: "done", percent: 100, wall_s: 42, phase: "done", failure: null, current_steps: [], eta_s: null });
  });

  it("is failed with the failing step, its hint and the log tail", () => {
    const run = new RunScript().start().stepStart("preflight").stepEnd("preflight", "changed");
    run.stepStart("apt").stepEnd("apt", "failed", 3, {
      message: "apt-get install failed (exit 100)",
      hint: "check the apt sources",
      log_tail: "E: Unable to locate package foo",
    });
    run.end(false, { failed_step: "apt", hint: "apt failed: check the apt sources", log_tail: "E: Unable to locate package foo" });
    const s = deriveStatus(stored(run), opts());
    expect(s.state).toBe("failed");
    expect(s.phase).toBe("failed at apt");
    expect(s.failure).toEqual({
      step: "apt",
      message: "apt-get install failed (exit 100)",
      hint: "apt failed: check the apt sources",
      log_tail: "E: Unable to locate package foo",
    });
  });

  it("is stale (not failed) after the configured silence", () => {
    const run = new RunScript().start().stepStart("preflight");
    const later = (s: number) => new Date(received.getTime() + s * 1000);
    expect(deriveStatus(stored(run), opts(later(59), 60)).state).toBe("running");
    const s = deriveStatus(stored(run), opts(later(61), 60));
    expect(s.state).toBe("stale");
    expect(s.failure).toBeNull();
    expect(s.silent_s).toBe(61);
  });

  it("folds events in seq order whatever order they come in, and counts gaps", () => {
    const run = new RunScript().start().stepStart("preflight").stepEnd("preflight", "changed").progress("a", 10).progress("b", 20);
    const all = stored(run);
    const shuffled = [all[4]!, all[0]!, all[2]!, all[1]!, all[3]!];
    expect(deriveStatus(shuffled, opts())).toEqual(deriveStatus(all, opts()));
    const gappy = deriveStatus([all[0]!, all[4]!], opts());
    expect(gappy.missing_seqs).toBe(3);
    expect(gappy.phase).toBe("b");
  });

  it("fingerprints ignore the passing of time", () => {
    const run = new RunScript().start();
    const a = deriveStatus(stored(run), opts(received));
    const b = deriveStatus(stored(run), opts(new Date(received.getTime() + 5000)));
    expect(statusFingerprint(a)).toBe(statusFingerprint(b));
  });
});
