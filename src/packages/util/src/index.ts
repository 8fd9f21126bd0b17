// Hand-picked: only what other packages use (humanBytes/humanDuration stay in human.ts, unexported).
export { isValidUUID, UUID_PATTERN } from "./uuid.js";
export { shellQuote } from "./shell.js";
