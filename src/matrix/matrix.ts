// CI matrices (pure): compiled plans -> one job per (arch, variant), in the forms
// CI systems consume. The CI system is the scheduler and the registry the shared
// cache; this only says what each job builds and what the jobs have in common.
import { stringify } from 'yaml';
import type { Plan } from '../engine/compile.js';
import { UsageError } from '../engine/errors.js';

/** GitHub Actions runs at most this many jobs per matrix. */
export const GITHUB_MATRIX_LIMIT = 256;

export interface MatrixEntry {
  /** Unique, safe as a job name: variant-arch. */
  id: string;
  arch: string;
  variant: string;
  /** The final (published) stages' cache keys, stage -> key. */
  keys: Record<string, string>;
  /** Heavy upstream stages this job needs that other jobs need too (same key): built once, pulled by the rest. */
  shares: string[];
}

/** Stage names a variant needs, inputs first. */
function variantClosure(plan: Plan, variant: string): string[] {
  const byName = new Map(plan.stages.map((s) => [s.name, s]));
  const need = new Set<string>();
  const visit = (n: string) => {
    if (need.has(n)) return;
    need.add(n);
    for (const ref of Object.values(byName.get(n)!.inputs)) visit(ref);
  };
  for (const s of plan.sinks[variant] ?? []) visit(s);
  return plan.stages.filter((s) => need.has(s.name)).map((s) => s.name);
}

/** One entry per (arch, variant) of the given plans (each compiled for the variants wanted on its arch). */
export function matrixEntries(plans: Plan[]): MatrixEntry[] {
  const raw: { arch: string; variant: string; keys: Record<string, string>; heavy: { name: string; key: string }[] }[] = [];
  const users = new Map<string, number>();
  for (const plan of plans) {
    const byName = new Map(plan.stages.map((s) => [s.name, s]));
    for (const variant of plan.variants) {
      const keys: Record<string, string> = {};
      for (const s of plan.sinks[variant] ?? []) keys[s] = byName.get(s)!.key;
      const sinks = new Set(Object.keys(keys));
      const heavy = variantClosure(plan, variant)
        .map((n) => byName.get(n)!)
        .filter((s) => s.heavy && !sinks.has(s.name))
        .map((s) => ({ name: s.name, key: s.key }));
      for (const h of heavy) users.set(h.key, (users.get(h.key) ?? 0) + 1);
      raw.push({ arch: plan.arch, variant, keys, heavy });
    }
  }
  return raw.map((r) => ({
    id: `${r.variant}-${r.arch}`.replace(/[^A-Za-z0-9_-]/g, '_'),
    arch: r.arch,
    variant: r.variant,
    keys: r.keys,
    shares: r.heavy.filter((h) => (users.get(h.key) ?? 0) > 1).map((h) => h.name),
  }));
}

/** --affected: entries whose final outputs are all in the remote cache are dropped (and named). */
export function dropCached(entries: MatrixEntry[], cached: ReadonlySet<string>): { kept: MatrixEntry[]; dropped: MatrixEntry[] } {
  const kept: MatrixEntry[] = [];
  const dropped: MatrixEntry[] = [];
  for (const e of entries) {
    const keys = Object.values(e.keys);
    (keys.length && keys.every((k) => cached.has(k)) ? dropped : kept).push(e);
  }
  return { kept, dropped };
}

/** `{"include":[…]}` for strategy.matrix: ${{ fromJSON(needs.plan.outputs.matrix) }}; one line (a $GITHUB_OUTPUT value). */
export function githubMatrix(entries: MatrixEntry[]): string {
  if (entries.length > GITHUB_MATRIX_LIMIT) {
    throw new UsageError(
      `the matrix has ${entries.length} entries; GitHub Actions allows at most ${GITHUB_MATRIX_LIMIT} jobs per matrix: ` +
        `narrow it (pipeline matrix ARCH --variant V…) into several plan outputs, or use --format json`,
    );
  }
  // An empty include makes GitHub reject the job; the workflow skips the build when `count` is 0.
  return JSON.stringify({ include: entries });
}

/** A GitLab child pipeline (trigger: include: artifact) with one build job per entry. */
export function gitlabPipeline(entries: MatrixEntry[], opts: { image?: string } = {}): string {
  const doc: Record<string, unknown> = { stages: ['build'] };
  if (opts.image) doc.default = { image: opts.image };
  if (!entries.length) {
    // A child pipeline must hold at least one job.
    doc['nothing-to-build'] = { stage: 'build', script: ['echo "every matrix entry is already in the remote cache"'] };
  }
  for (const e of entries) {
    doc[`build-${e.id}`] = {
      stage: 'build',
      variables: { PIPELINE_ARCH: e.arch, PIPELINE_VARIANT: e.variant },
      // The remote cache comes from $PIPELINE_REMOTE_CACHE (a CI/CD variable), read by the CLI itself.
      script: ['npx pipeline build "$PIPELINE_ARCH" "$PIPELINE_VARIANT" --json'],
      artifacts: { paths: [`images/${e.variant}/${e.arch}/`] },
    };
  }
  return stringify(doc);
}
