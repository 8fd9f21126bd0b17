/** A small server-sent-events reader over fetch, for the stream tests. */
export interface SseEvent {
  event: string;
  data: string;
}

export class SseClient {
  private buffer = "";
  private readonly queue: SseEvent[] = [];
  private waiter: (() => void) | null = null;
  private readonly abort = new AbortController();
  private reader: ReadableStreamDefaultReader<Uint8Array> | null = null;
  status = 0;
  contentType = "";

  async open(url: string): Promise<this> {
    const res = await fetch(url, { signal: this.abort.signal, headers: { accept: "text/event-stream" } });
    this.status = res.status;
    this.contentType = res.headers.get("content-type") ?? "";
    if (!res.body) throw new Error("no body");
    this.reader = res.body.getReader();
    void this.pump();
    return this;
  }

  private async pump(): Promise<void> {
    const decoder = new TextDecoder();
    try {
      for (;;) {
        const { done, value } = await this.reader!.read();
        if (done) return;
        this.buffer += decoder.decode(value, { stream: true });
        for (let i = this.buffer.indexOf("\n\n"); i >= 0; i = this.buffer.indexOf("\n\n")) {
          const block = this.buffer.slice(0, i);
          this.buffer = this.buffer.slice(i + 2);
          const ev: SseEvent = { event: "message", data: "" };
          const data: string[] = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) ev.event = line.slice(7);
            else if (line.startsWith("data: ")) data.push(line.slice(6));
          }
          if (data.length === 0) continue;
          ev.data = data.join("\n");
          this.queue.push(ev);
          this.waiter?.();
        }
      }
    } catch {
      // aborted
    }
  }

  /** The next event matching `pred`, or an error after `timeoutMs`. */
  async next(pred: (e: SseEvent) => boolean = () => true, timeoutMs = 10_000): Promise<SseEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.queue.findIndex(pred);
      if (i >= 0) return this.queue.splice(i, 1)[0]!;
      this.queue.length = 0;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error("no matching server-sent event in time");
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
  }

  close(): void {
    this.abort.abort();
  }
}
