/**
 * POSIX shell quoting: the value becomes exactly one word, taken literally by
 * sh, dash and bash. Single quotes protect everything (`$`, backticks, `\`,
 * newlines); a single quote inside is written as `'\''` (close, escaped
 * quote, reopen). NUL cannot be represented in a shell word, so it throws.
 */
export function shellQuote(value: string): string {
  if (value.includes("\0")) throw new Error("shellQuote: a shell word cannot contain NUL");
  // Bare words that need no quoting stay readable in rendered scripts.
  if (/^[A-Za-z0-9_./:@%+,-]+$/.test(value)) return value;
  return `'${value.replace(/'/g, `'\\''`)}'`;
}
