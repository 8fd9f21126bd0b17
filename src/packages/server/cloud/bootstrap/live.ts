/**
 * Live status changes across hub processes. Every hub LISTENs on one
 * PostgreSQL channel; the events route NOTIFYs it with the host id after
 * storing new events, so a browser connected to any hub hears about events
 * posted to any other. (PGlite supports LISTEN/NOTIFY in-process, so the
 * embedded default behaves the same.) Streams also re-derive the status on a
 * slow timer: that is what turns a silent run into "stale", and it covers a
 * notification lost while a connection was being re-established.
 */
import type { Db } from "./db.js";
import { HOST_CHANGED_CHANNEL } from "./store.js";

export class HostChangeFeed {
  private readonly subscribers = new Map<string, Set<() => void>>();
  private listening: Promise<() => Promise<void>> | null = null;

  constructor(private readonly db: Db) {}

  /** Call `onChange` whenever the host's events change; returns the unsubscribe function. */
  async subscribe(hostId: string, onChange: () => void): Promise<() => void> {
    this.listening ??= this.db.listen(HOST_CHANGED_CHANNEL, (payload) => this.dispatch(payload));
    await this.listening;
    let set = this.subscribers.get(hostId);
    if (!set) {
      set = new Set();
      this.subscribers.set(hostId, set);
    }
    set.add(onChange);
    return () => {
      set.delete(onChange);
      if (set.size === 0) this.subscribers.delete(hostId);
    };
  }

  private dispatch(hostId: string): void {
    for (const cb of this.subscribers.get(hostId) ?? []) cb();
  }

  async close(): Promise<void> {
    const stop = this.listening;
    this.listening = null;
    this.subscribers.clear();
    if (stop) await (await stop)();
  }
}
