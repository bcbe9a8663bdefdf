// The real rootfs of fixtures/minimal.yaml, built (or found in the shared test
// cache) by the engine itself, for tests that need a real Debian tree.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { cli, ROOT, TEST_CACHE } from './cli.js';

export const FIXTURE = path.join(ROOT, 'fixtures', 'minimal.yaml');

/** Path of a stage's output file in the test cache, building it first if needed. */
export async function fixtureOutput(stage: string, file: string, variant = 'ipxe'): Promise<string> {
  const b = await cli(['build', 'amd64', variant, '-f', FIXTURE, '--out', path.join(TEST_CACHE, '..', 'pipeline-test-images')]);
  if (b.code !== 0) throw new Error(`building the fixture failed:\n${b.stderr}`);
  const p = await cli(['plan', 'amd64', variant, '--json', '-f', FIXTURE]);
  const key = (JSON.parse(p.stdout).stages as { name: string; key: string }[]).find((s) => s.name === stage)?.key;
  if (!key) throw new Error(`no stage ${stage} in the fixture's ${variant} plan`);
  const entry = JSON.parse(await readFile(path.join(TEST_CACHE, 'entries', `${key}.json`), 'utf8')) as { files: { path: string; sha256: string }[] };
  const f = entry.files.find((x) => x.path === file);
  if (!f) throw new Error(`stage ${stage} has no ${file}`);
  return path.join(TEST_CACHE, 'blobs', 'sha256', f.sha256.slice(0, 2), f.sha256);
}

export const fixtureRootfs = () => fixtureOutput('rootfs', 'rootfs.tar');
