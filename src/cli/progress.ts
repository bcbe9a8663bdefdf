// Progress output. Three forms: a live status line on a TTY, plain lines when
// piped (CI logs), and JSON lines (--json) for machines. Quiet when all is cached.
import type { PlanStage } from '../engine/compile.js';
import type { Reporter, StageResult } from '../engine/scheduler.js';

export type ProgressMode = 'tty' | 'plain' | 'json' | 'silent';

export function pickMode(json: boolean, stream: NodeJS.WriteStream = process.stderr): ProgressMode {
  if (json) return 'json';
  return stream.isTTY ? 'tty' : 'plain';
}

export class Progress implements Reporter {
  private running = new Map<string, number>();
  private timer?: NodeJS.Timeout;
  private statusShown = false;

  constructor(
    readonly mode: ProgressMode,
    private readonly out: NodeJS.WritableStream = process.stderr,
    private readonly verbose = false,
  ) {}

  event(obj: Record<string, unknown>): void {
    if (this.mode === 'json') process.stdout.write(JSON.stringify(obj) + '\n');
  }

  start(st: PlanStage): void {
    this.running.set(st.name, Date.now());
    if (this.mode === 'json') this.event({ event: 'stage-start', stage: st.name, kind: st.kind, key: st.key });
    else if (this.mode === 'plain') this.print(`  ▸ ${st.name} (${st.kind})`);
    else if (this.mode === 'tty') this.tick();
  }

  done(st: PlanStage, r: StageResult): void {
    this.running.delete(st.name);
    if (this.mode === 'json') {
      this.event({ event: 'stage-done', stage: st.name, kind: st.kind, key: st.key, status: r.status, seconds: round(r.seconds) });
      return;
    }
    if (r.status === 'cached' || r.status === 'unused') return; // says little when all goes well
    const mark = r.status === 'built' ? '✓' : r.status === 'pulled' ? '↓' : r.status === 'failed' ? '✗' : '∅';
    this.print(`  ${mark} ${st.name} (${st.kind}) ${r.status} in ${fmt(r.seconds)}`);
  }

  line(st: PlanStage, l: string): void {
    if (this.mode === 'json') {
      if (this.verbose) this.event({ event: 'log', stage: st.name, line: l });
    } else if (this.verbose || l.startsWith('warning:')) this.print(`    ${st.name}| ${l}`);
  }

  /** Plain message (not in JSON mode). */
  info(msg: string): void {
    if (this.mode !== 'json' && this.mode !== 'silent') this.print(msg);
  }

  private print(msg: string): void {
    if (this.mode === 'silent') return;
    this.clearStatus();
    this.out.write(msg + '\n');
    if (this.mode === 'tty') this.tick();
  }

  private clearStatus(): void {
    if (this.statusShown) {
      this.out.write('\r\x1b[2K');
      this.statusShown = false;
    }
  }

  private tick(): void {
    if (this.mode !== 'tty') return;
    this.clearStatus();
    if (!this.running.size) {
      if (this.timer) clearInterval(this.timer);
      this.timer = undefined;
      return;
    }
    const now = Date.now();
    const parts = [...this.running].map(([n, t]) => `${n} ${fmt((now - t) / 1000)}`);
    const cols = (this.out as NodeJS.WriteStream).columns ?? 100;
    this.out.write(`  … ${parts.join(' · ')}`.slice(0, cols - 1));
    this.statusShown = true;
    if (!this.timer) {
      this.timer = setInterval(() => this.tick(), 250);
      this.timer.unref();
    }
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.clearStatus();
  }
}

export function fmt(s: number): string {
  return s < 10 ? `${s.toFixed(2)}s` : s < 120 ? `${s.toFixed(1)}s` : `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, '0')}s`;
}

function round(s: number): number {
  return Math.round(s * 1000) / 1000;
}

/** The end-of-build table: time per stage and the cache hits. */
export function summaryTable(results: StageResult[]): string {
  const rows = results.filter((r) => r.status !== 'unused');
  const w = Math.max(5, ...rows.map((r) => r.name.length));
  const k = Math.max(4, ...rows.map((r) => r.kind.length));
  const lines = rows.map((r) => `  ${r.name.padEnd(w)}  ${r.kind.padEnd(k)}  ${r.status.padEnd(9)} ${r.status === 'built' || r.status === 'failed' || r.status === 'pulled' ? fmt(r.seconds) : ''}`.trimEnd());
  return [`  ${'stage'.padEnd(w)}  ${'kind'.padEnd(k)}  status`, ...lines].join('\n');
}
