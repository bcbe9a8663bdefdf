// Ctrl-C / SIGTERM for long-running commands (build, test, push, repro): the first
// signal aborts (running tools get SIGTERM, then SIGKILL after the runner's grace,
// and nothing partial is kept); a second one exits at once. Either way every tool
// process dies with us (src/engine/process.ts ties them to our life).

export interface Interrupt {
  signal: AbortSignal;
  /** Stop listening (for commands that return to a caller rather than exit). */
  dispose(): void;
}

/** `who` and `doing` make the message: "\n<who>: SIGINT, <doing>…". */
export function interruptSignal(who = 'pipeline', doing = 'stopping running stages'): Interrupt {
  const ac = new AbortController();
  let count = 0;
  const onSig = (sig: NodeJS.Signals) => {
    if (++count > 1) process.exit(130);
    process.stderr.write(`\n${who}: ${sig}, ${doing}…\n`);
    ac.abort(new Error(sig));
  };
  process.on('SIGINT', onSig);
  process.on('SIGTERM', onSig);
  return {
    signal: ac.signal,
    dispose: () => {
      process.off('SIGINT', onSig);
      process.off('SIGTERM', onSig);
    },
  };
}
