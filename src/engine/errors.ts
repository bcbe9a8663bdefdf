// Error classes the CLI maps to exit codes: 2 for usage/spec errors, 1 for build failures.

export interface SourceLocation {
  file: string;
  line: number; // 1-based
  col: number; // 1-based
  /** The source line, for a code frame. */
  lineText?: string;
  /** Length of the highlighted span on that line. */
  length?: number;
}

export interface SpecIssue {
  loc: SourceLocation;
  /** Dotted path in the spec, e.g. stages.rootfs.with.suite */
  path: string;
  message: string;
}

/** Issues printed in full; the rest are counted. */
const MAX_SHOWN = 50;

/** One or more problems in a spec file. Nothing has been written when this is thrown. */
export class SpecError extends Error {
  readonly exitCode = 2;
  constructor(readonly issues: SpecIssue[]) {
    // A mangled file can yield thousands of issues; the first ones are what helps.
    const shown = issues.slice(0, MAX_SHOWN).map(formatIssue);
    if (issues.length > MAX_SHOWN) shown.push(`… and ${issues.length - MAX_SHOWN} more`);
    super(shown.join('\n'));
    this.name = 'SpecError';
  }
}

/** Bad command line: unknown arch or variant, missing argument, … */
export class UsageError extends Error {
  readonly exitCode = 2;
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/** A build that started and failed (a stage, a tool, the disk). */
export class BuildError extends Error {
  readonly exitCode = 1;
  constructor(
    message: string,
    readonly detail = '',
  ) {
    super(message);
    this.name = 'BuildError';
  }
}

/** Code frames show at most this many characters of a long line, around the column. */
const FRAME_WIDTH = 120;

export function formatIssue(i: SpecIssue): string {
  const head = `${i.loc.file}:${i.loc.line}:${i.loc.col}: error: ${i.path ? i.path + ': ' : ''}${i.message}`;
  if (i.loc.lineText === undefined) return head;
  const num = String(i.loc.line);
  const pad = ' '.repeat(num.length);
  let text = i.loc.lineText;
  let col = i.loc.col;
  let len = Math.max(1, i.loc.length ?? 1);
  if (text.length > FRAME_WIDTH) {
    const start = Math.max(0, Math.min(col - 1 - FRAME_WIDTH / 4, text.length - FRAME_WIDTH));
    text = (start > 0 ? '…' : '') + text.slice(start, start + FRAME_WIDTH) + (start + FRAME_WIDTH < text.length ? '…' : '');
    col = col - start + (start > 0 ? 1 : 0);
    len = Math.min(len, FRAME_WIDTH - (col - 1));
  }
  const caret = ' '.repeat(Math.max(0, col - 1)) + '^'.repeat(Math.max(1, len));
  return `${head}\n  ${num} | ${text}\n  ${pad} | ${caret}`;
}
