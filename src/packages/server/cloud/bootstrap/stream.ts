/**
 * The status stream (`GET …/hosts/:id/stream`, server-sent events).
 *
 * One watch per host, however many viewers: a change notification (or the
 * slow recheck timer, which turns a silent run into "stale") derives the
 * host's status once, in bounded time (status.ts), and writes it to every
 * viewer only when it changed. So a viewer costs one write per change, and a
 * crowd of anonymous viewers of a huge run costs the hub no more derivations
 * than one viewer does. Bursts of notifications are coalesced: at most one
 * derivation per host runs at a time, and one more after it if anything
 * arrived meanwhile.
 */
import type { Request, Response } from "express";
import type { Db } from "./db.js";
import type { ErrorLogger } from "./http-errors.js";
import { HostChangeFeed } from "./live.js";
import { hostStatus, statusFingerprint } from "./status.js";

export interface StatusStreamsOptions {
  db: Db;
  now: () => Date;
  staleAfterS: number;
  /** How often each watched host's status is re-derived without a notification. */
  recheckMs: number;
  heartbeatMs: number;
  logError: ErrorLogger;
}

interface HostWatch {
  readonly hostId: string;
  readonly viewers: Set<Response>;
  /** The last status sent (its fingerprint and its SSE frame), null before the first derivation. */
  last: { fingerprint: string; frame: string } | null;
  busy: boolean;
  again: boolean;
  unsubscribe: () => void;
  recheck: NodeJS.Timeout;
}

export class StatusStreams {
  private readonly feed: HostChangeFeed;
  private readonly watches = new Map<string, HostWatch>();
  private readonly heartbeat: NodeJS.Timeout;
  /** Derivations run so far (all hosts), and status frames written to viewers: what the tests count. */
  derivations = 0;
  writes = 0;

  constructor(private readonly o: StatusStreamsOptions) {
    this.feed = new HostChangeFeed(o.db);
    this.heartbeat = setInterval(() => this.ping(), o.heartbeatMs);
    this.heartbeat.unref();
  }

  /** Serve one viewer of `hostId` until either side closes. */
  async serve(req: Request, res: Response, hostId: string): Promise<void> {
    res.writeHead(200, {
      "Content-Type": "text/event-stream; charset=utf-8",
      "Cache-Control": "no-store",
      Connection: "keep-alive",
      "X-Accel-Buffering": "no", // nginx: do not buffer the stream
    });
    res.write("retry: 2000\n\n");
    const watch = await this.watch(hostId);
    watch.viewers.add(res);
    const stop = () => this.leave(watch, res);
    req.on("close", stop);
    res.on("close", stop);
    if (watch.last) res.write(watch.last.frame);
    else await this.derive(watch);
  }

  /** End every open stream and stop listening. */
  async close(): Promise<void> {
    clearInterval(this.heartbeat);
    for (const watch of this.watches.values()) {
      for (const res of watch.viewers) res.end();
      this.unwatch(watch);
    }
    this.watches.clear();
    await this.feed.close();
  }

  private async watch(hostId: string): Promise<HostWatch> {
    const existing = this.watches.get(hostId);
    if (existing) return existing;
    const watch: HostWatch = {
      hostId,
      viewers: new Set(),
      last: null,
      busy: false,
      again: false,
      unsubscribe: () => undefined,
      recheck: setInterval(() => void this.derive(watch), this.o.recheckMs),
    };
    watch.recheck.unref();
    this.watches.set(hostId, watch);
    watch.unsubscribe = await this.feed.subscribe(hostId, () => void this.derive(watch));
    return watch;
  }

  private leave(watch: HostWatch, res: Response): void {
    watch.viewers.delete(res);
    if (watch.viewers.size === 0 && this.watches.get(watch.hostId) === watch) {
      this.unwatch(watch);
      this.watches.delete(watch.hostId);
    }
  }

  private unwatch(watch: HostWatch): void {
    clearInterval(watch.recheck);
    watch.unsubscribe();
  }

  private async derive(watch: HostWatch): Promise<void> {
    if (watch.busy) {
      watch.again = true;
      return;
    }
    watch.busy = true;
    try {
      do {
        watch.again = false;
        this.derivations += 1;
        const status = await hostStatus(this.o.db, watch.hostId, { now: this.o.now(), staleAfterS: this.o.staleAfterS });
        const fingerprint = statusFingerprint(status);
        if (watch.last?.fingerprint !== fingerprint) {
          watch.last = { fingerprint, frame: `event: status\ndata: ${JSON.stringify(status)}\n\n` };
          for (const res of watch.viewers) res.write(watch.last.frame);
          this.writes += watch.viewers.size;
        }
      } while (watch.again && watch.viewers.size > 0);
    } catch (err) {
      this.o.logError(`stream for host ${watch.hostId}`, err);
    } finally {
      watch.busy = false;
    }
  }

  private ping(): void {
    for (const watch of this.watches.values()) for (const res of watch.viewers) res.write(": ping\n\n");
  }
}
