/** Lowercase canonical UUID (8-4-4-4-12 hex), as the hub stores host ids. */
export const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * True for a lowercase canonical UUID. Uppercase is rejected on purpose: host
 * ids appear in paths and URLs, and one spelling per id keeps them comparable.
 */
export function isValidUUID(value: unknown): value is string {
  return typeof value === "string" && UUID_PATTERN.test(value);
}
