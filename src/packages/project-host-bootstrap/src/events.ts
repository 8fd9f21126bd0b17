/**
 * Progress events: what bootstrap.py sends to the hub while it runs.
 *
 * bootstrap.py's background sender spools every event to disk, then POSTs
 * them in batches (`EventBatchSchema`) to `hub.events_url` with the
 * bootstrap token in the Authorization header. Every event carries the run
 * id and a per-run sequence number starting at 0, so the hub can store them
 * idempotently (host, run_id, seq) and in order even when batches are
 * replayed after an outage.
 */
import { z } from "zod/v4";
import { UUID_RE } from "./config.js";

export const RUN_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{7,63}$/;
export const STEP_NAME_RE = /^[a-z][a-z0-9_.-]{0,63}$/;
export const MAX_EVENTS_PER_BATCH = 200;
export const MAX_BATCH_BYTES = 1024 * 1024;
export const MAX_TEXT = 8192;

/**
 * How a step ended (bootstrap.py's `Outcome`): changed (its check found
 * work, it applied, and its check is now satisfied), unchanged (nothing to
 * do), failed, blocked (a dependency failed, or the run stopped first).
 */
export const STEP_OUTCOMES = ["changed", "unchanged", "failed", "blocked"] as const;
export type StepOutcome = (typeof STEP_OUTCOMES)[number];

/**
 * Text a database can store and a browser can show: no NUL (U+0000, which
 * PostgreSQL's text and jsonb refuse) and no unpaired UTF-16 surrogate (not
 * Unicode; jsonb refuses its escape). bootstrap.py replaces both before
 * sending (a failing command's output may hold anything); the hub refuses a
 * batch that still has them, naming the field, with 422.
 */
// NUL, a high surrogate not followed by a low one, or a low one not preceded by a high one.
// biome-ignore lint/suspicious/noControlCharactersInRegex: finding NUL is the point
const UNSTORABLE_RE = /\u0000|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

export function isStorableText(s: string): boolean {
  return !UNSTORABLE_RE.test(s);
}

export const STORABLE_TEXT_MESSAGE = "must not contain NUL (U+0000) or unpaired surrogates (U+D800-U+DFFF)";

/** A string of at most `max` UTF-16 code units that `isStorableText` accepts. */
export const storableText = (max: number) => z.string().max(max).refine(isStorableText, { message: STORABLE_TEXT_MESSAGE });

const Text = storableText(MAX_TEXT);

const Base = {
  run_id: z.string().regex(RUN_ID_RE).describe("Run id, new for every run of bootstrap.py."),
  seq: z.int().min(0).max(1_000_000).describe("Sequence number within the run, from 0, without gaps."),
  ts: z.number().min(0).describe("Unix time in seconds (float) when the event happened."),
};

export const StepInfoSchema = z.strictObject({
  name: z.string().regex(STEP_NAME_RE),
  deps: z.array(z.string().regex(STEP_NAME_RE)).max(64),
  weight: z.number().min(0).describe("Expected duration in seconds, used to weight percent."),
});

export const RunStartEvent = z.strictObject({
  ...Base,
  type: z.literal("run_start"),
  version: storableText(64).describe("bootstrap.py version."),
  parallel: z.boolean(),
  steps: z.array(StepInfoSchema).max(128).describe("The plan, in stable order."),
});

export const StepStartEvent = z.strictObject({
  ...Base,
  type: z.literal("step_start"),
  step: z.string().regex(STEP_NAME_RE),
});

/** CPU-seconds of one step: its own thread (RUSAGE_THREAD) and the child processes it reaped (wait4 rusage). */
export const StepCpuSchema = z.strictObject({
  user_s: z.number().min(0),
  sys_s: z.number().min(0),
  children_user_s: z.number().min(0),
  children_sys_s: z.number().min(0),
});
export type StepCpu = z.output<typeof StepCpuSchema>;

export const StepEndEvent = z.strictObject({
  ...Base,
  type: z.literal("step_end"),
  step: z.string().regex(STEP_NAME_RE),
  outcome: z.enum(STEP_OUTCOMES),
  duration_s: z.number().min(0),
  message: Text.default(""),
  hint: Text.nullable().default(null),
  log_tail: Text.nullable().default(null),
  cpu: StepCpuSchema.nullable().default(null).describe("CPU-seconds the step used; null when not measured (blocked, older bootstrap.py)."),
});

export const ProgressEvent = z.strictObject({
  ...Base,
  type: z.literal("progress"),
  phase: storableText(128).describe("Human-readable phase, e.g. `installing bundles`."),
  percent: z.number().min(0).max(100),
});

export const RunEndEvent = z.strictObject({
  ...Base,
  type: z.literal("run_end"),
  ok: z.boolean(),
  wall_s: z.number().min(0),
  failed_step: z.string().regex(STEP_NAME_RE).nullable().default(null),
  hint: Text.nullable().default(null),
  log_tail: Text.nullable().default(null),
});

export const BootstrapEventSchema = z.discriminatedUnion("type", [RunStartEvent, StepStartEvent, StepEndEvent, ProgressEvent, RunEndEvent]);
export type BootstrapEvent = z.output<typeof BootstrapEventSchema>;
export type BootstrapEventInput = z.input<typeof BootstrapEventSchema>;

export const EventBatchSchema = z.strictObject({
  host_id: z.string().regex(UUID_RE),
  events: z.array(BootstrapEventSchema).min(1).max(MAX_EVENTS_PER_BATCH),
});
export type EventBatch = z.output<typeof EventBatchSchema>;
