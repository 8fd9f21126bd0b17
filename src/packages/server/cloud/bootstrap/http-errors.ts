/**
 * One error type for expected failures, and the one error handler that turns
 * any error into a response without leaking internals.
 */
import type { ErrorRequestHandler } from "express";
import type { z } from "zod/v4";

/** An error whose message is meant for the client. */
export class HttpError extends Error {
  override readonly name = "HttpError";
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

export function badRequest(what: string, error: z.ZodError): HttpError {
  const reasons = error.issues.map((i) => `${i.path.length ? i.path.join(".") + ": " : ""}${i.message}`);
  return new HttpError(400, `invalid ${what}: ${reasons.slice(0, 10).join("; ")}${reasons.length > 10 ? `; and ${reasons.length - 10} more` : ""}`);
}

/** body-parser's errors carry a `type`; these are the client's fault. */
function bodyParserError(err: unknown, maxBytes: number): HttpError | null {
  const type = (err as { type?: unknown } | null)?.type;
  if (type === "entity.too.large") return new HttpError(413, `request body larger than ${maxBytes} bytes`);
  if (type === "entity.parse.failed") return new HttpError(400, "request body is not valid JSON");
  if (type === "encoding.unsupported" || type === "charset.unsupported") return new HttpError(415, "unsupported body encoding");
  if (type === "request.aborted") return new HttpError(400, "request aborted");
  return null;
}

export type ErrorLogger = (message: string, error: unknown) => void;

export function errorHandler(opts: { maxBodyBytes: number; logError: ErrorLogger }): ErrorRequestHandler {
  return (err, req, res, next) => {
    if (res.headersSent) {
      next(err);
      return;
    }
    const known = err instanceof HttpError ? err : bodyParserError(err, opts.maxBodyBytes);
    if (known) {
      res.status(known.status).set(known instanceof HttpError ? known.headers : {}).json({ error: known.message });
      return;
    }
    // Unknown: log it for the operator (method and path only, never bodies or headers).
    opts.logError(`${req.method} ${req.baseUrl}${req.path} failed`, err);
    res.status(500).json({ error: "internal error" });
  };
}
