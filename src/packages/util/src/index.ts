// Hand-picked: only what other packages use (humanBytes/humanDuration stay in human.ts, unexported).

export { shellQuote } from "./shell.js";
export { isValidUUID, UUID_PATTERN } from "./uuid.js";
