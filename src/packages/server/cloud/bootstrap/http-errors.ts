/**
 * One error type for expected failures, and the one error handler that turns
 * any error into a response without leaking internals.
 */
import { STATUS_CODES } from "node:http";
import type { ErrorRequestHandler, RequestHandler } from "express";
import type { z } from "zod/v4";

/** An error whose message is meant for the client. */
export class HttpError extends Error {
  override readonly name = "HttpError";
  constructor(
    readonly status: number,
    message: string,
    readonly headers: Record<string, string> = {},
    /** A stable machine-readable reason, sent as `code` beside `error` (e.g. "token_already_exchanged"). */
    readonly code?: string,
  ) {
    super(message);
  }
}

function zodReasons(error: z.ZodError): string {
  const reasons = error.issues.map((i) => `${i.path.length ? `${i.path.join(".")}: ` : ""}${i.message}`);
  return `${reasons.slice(0, 10).join("; ")}${reasons.length > 10 ? `; and ${reasons.length - 10} more` : ""}`;
}

/** 400: a malformed part of the request line (host id, secret name, provision request). */
export function badRequest(what: string, error: z.ZodError): HttpError {
  return new HttpError(400, `invalid ${what}: ${zodReasons(error)}`);
}

/** 422: a well-formed JSON body whose content is refused, naming each field (`events.3.message: …`). */
export function invalidContent(what: string, error: z.ZodError): HttpError {
  return new HttpError(422, `invalid ${what}: ${zodReasons(error)}`);
}

/** The last route of a router or app. */
export const notFound: RequestHandler = (req, _res, next) => next(new HttpError(404, `no route for ${req.method} ${req.path}`));

/** body-parser's errors carry a `type`; these are the client's fault. */
function bodyParserError(err: unknown, maxBytes: number): HttpError | null {
  const type = (err as { type?: unknown } | null)?.type;
  if (type === "entity.too.large") return new HttpError(413, `request body larger than ${maxBytes} bytes`);
  if (type === "entity.parse.failed") return new HttpError(400, "request body is not valid JSON");
  if (type === "encoding.unsupported" || type === "charset.unsupported") return new HttpError(415, "unsupported body encoding");
  if (type === "request.aborted") return new HttpError(400, "request aborted");
  return null;
}

/**
 * Express's own client errors: a path parameter that is not valid
 * percent-encoding (a URIError with status 400), and any other error it marks
 * as the client's (`status` 4xx). Answered with the status and a fixed
 * message, never logged: strangers must not be able to fill the log.
 */
function clientError(err: unknown): HttpError | null {
  if (err instanceof URIError) return new HttpError(400, "malformed percent-encoding in the URL");
  const status = (err as { status?: unknown; statusCode?: unknown } | null)?.status ?? (err as { statusCode?: unknown } | null)?.statusCode;
  if (typeof status === "number" && Number.isInteger(status) && status >= 400 && status < 500) {
    return new HttpError(status, (STATUS_CODES[status] ?? "bad request").toLowerCase());
  }
  return null;
}

export type ErrorLogger = (message: string, error: unknown) => void;

export function errorHandler(opts: { maxBodyBytes: number; logError: ErrorLogger }): ErrorRequestHandler {
  return (err, req, res, next) => {
    if (res.headersSent) {
      next(err);
      return;
    }
    const known = err instanceof HttpError ? err : (bodyParserError(err, opts.maxBodyBytes) ?? clientError(err));
    if (known) {
      res
        .status(known.status)
        .set(known instanceof HttpError ? known.headers : {})
        .json(known instanceof HttpError && known.code ? { error: known.message, code: known.code } : { error: known.message });
      return;
    }
    // Unknown: log it for the operator (method and path only, never bodies or
    // headers); the client learns nothing of it.
    opts.logError(`${req.method} ${req.baseUrl}${req.path} failed`, err);
    res.status(500).json({ error: "internal error" });
  };
}
