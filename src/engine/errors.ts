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

/** One or more problems in a spec file. Nothing has been written when this is thrown. */
export class SpecError extends Error {
  readonly exitCode = 2;
  constructor(readonly issues: SpecIssue[]) {
    super(issues.map(formatIssue).join('\n'));
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

export function formatIssue(i: SpecIssue): string {
  const head = `${i.loc.file}:${i.loc.line}:${i.loc.col}: error: ${i.path ? i.path + ': ' : ''}${i.message}`;
  if (i.loc.lineText === undefined) return head;
  const num = String(i.loc.line);
  const pad = ' '.repeat(num.length);
  const caret = ' '.repeat(Math.max(0, i.loc.col - 1)) + '^'.repeat(Math.max(1, i.loc.length ?? 1));
  return `${head}\n  ${num} | ${i.loc.lineText}\n  ${pad} | ${caret}`;
}
