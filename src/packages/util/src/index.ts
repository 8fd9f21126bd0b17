export { isValidUUID, UUID_PATTERN } from "./uuid.js";
export { humanBytes, humanDuration } from "./human.js";
export { shellQuote } from "./shell.js";
