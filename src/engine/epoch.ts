// SOURCE_DATE_EPOCH resolution. Every timestamp in an artifact derives from it.
import path from 'node:path';
import { UsageError } from './errors.js';
import { runProcess } from './process.js';

export type EpochSource = 'env' | 'spec' | 'git' | 'default';

/**
 * Order: the SOURCE_DATE_EPOCH environment variable, then the spec's
 * source_date_epoch, then the commit time of the spec file in git, then 0.
 */
export async function resolveEpoch(specFile: string, specValue: number | undefined, env = process.env): Promise<{ epoch: number; source: EpochSource }> {
  const e = env.SOURCE_DATE_EPOCH;
  if (e !== undefined && e !== '') {
    if (!/^\d+$/.test(e)) throw new UsageError(`SOURCE_DATE_EPOCH must be a whole number of seconds, got "${e}"`);
    return { epoch: Number(e), source: 'env' };
  }
  if (specValue !== undefined) return { epoch: specValue, source: 'spec' };
  const git = await gitCommitTime(specFile);
  if (git !== undefined) return { epoch: git, source: 'git' };
  return { epoch: 0, source: 'default' };
}

export async function gitCommitTime(file: string): Promise<number | undefined> {
  try {
    const { stdout } = await runProcess('git', ['log', '-1', '--format=%ct', '--', path.basename(file)], { cwd: path.dirname(path.resolve(file)), capture: true });
    const t = stdout.trim();
    return /^\d+$/.test(t) ? Number(t) : undefined;
  } catch {
    return undefined;
  }
}
