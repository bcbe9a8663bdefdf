// Stage work dirs in RAM (src/engine/scratch.ts), through the real CLI with the
// fixture kind fixtures/kinds/scratch-probe.mjs, which reports whether its work dir
// is a tmpfs: RAM by default when root with room, disk with PIPELINE_SCRATCH=disk,
// a retry on disk when the tmpfs fills, and no tmpfs left after kill -9 + next build.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { BIN, cli, ROOT } from '../helpers/cli.js';
import { mountsUnder } from '../../src/engine/fsutil.js';

const KINDS = path.join(ROOT, 'fixtures', 'kinds');
const root = process.getuid?.() === 0;

async function probeSpec(dir: string, withBlock: string): Promise<string> {
  const spec = path.join(dir, 'spec.yaml');
  await writeFile(spec, ['name: scratch', 'arches: [amd64, arm64]', 'source_date_epoch: 1704067200', 'stages:', '  probe:', '    kind: scratch-probe', `    with: ${withBlock}`, 'variants:', '  probe: [probe]', ''].join('\n'));
  return spec;
}

async function build(dir: string, spec: string, env: Record<string, string> = {}): Promise<{ where: string; log: string }> {
  const cache = path.join(dir, 'cache');
  const r = await cli(['build', 'amd64', 'probe', '-f', spec, '--out', path.join(dir, 'images'), '--cache-dir', cache], { env: { PIPELINE_KINDS_PATH: KINDS, ...env } });
  assert.equal(r.code, 0, r.stderr + r.stdout);
  assert.deepEqual(await mountsUnder(cache), [], 'a tmpfs was left mounted in the cache');
  assert.deepEqual(await readdir(path.join(cache, 'tmp')), [], 'staging left in tmp/');
  return { where: (await readFile(path.join(dir, 'images', 'probe', 'amd64', 'where.txt'), 'utf8')).trim(), log: await readFile(path.join(cache, 'logs', 'scratch', 'amd64', 'probe.log'), 'utf8') };
}

async function inDir(prefix: string, f: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(path.join(tmpdir(), prefix));
  try {
    await f(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test('a kind that declares memoryWorkDir gets a tmpfs work dir; PIPELINE_SCRATCH=disk keeps it on disk', { timeout: 60_000 }, async (t) => {
  if (!root) return t.skip('mounting a tmpfs needs root');
  await inDir('pipeline-scratch-', async (dir) => {
    const r = await build(dir, await probeSpec(dir, '{}'));
    assert.equal(r.where, 'tmpfs');
    assert.match(r.log, /^# work dir in RAM \(tmpfs/m);
  });
  await inDir('pipeline-scratch-', async (dir) => {
    const r = await build(dir, await probeSpec(dir, '{}'), { PIPELINE_SCRATCH: 'disk' });
    assert.equal(r.where, 'disk');
    assert.match(r.log, /^# work dir on disk \(PIPELINE_SCRATCH=disk\)/m);
  });
});

test('a stage that fills its tmpfs runs again on disk and succeeds', { timeout: 60_000 }, async (t) => {
  if (!root) return t.skip('mounting a tmpfs needs root');
  await inDir('pipeline-scratch-full-', async (dir) => {
    // An 8 MiB cap and 16 MiB written: ENOSPC in RAM, fine on disk.
    const r = await build(dir, await probeSpec(dir, '{ fill: 16 }'), { PIPELINE_SCRATCH: '8M' });
    assert.equal(r.where, 'disk');
    assert.match(r.log, /the work dir in RAM filled up \(.*ENOSPC.*\); running the stage again on disk/);
  });
});

test('kill -9 during a stage with a tmpfs work dir: the next build unmounts and removes it', { timeout: 60_000 }, async (t) => {
  if (!root) return t.skip('mounting a tmpfs needs root');
  await inDir('pipeline-scratch-kill-', async (dir) => {
    const cache = path.join(dir, 'cache');
    const child = spawn(process.execPath, [BIN, 'build', 'amd64', 'probe', '-f', await probeSpec(dir, '{ hold: "120" }'), '--out', path.join(dir, 'images'), '--cache-dir', cache], {
      cwd: ROOT,
      env: { ...process.env, PIPELINE_KINDS_PATH: KINDS },
      stdio: 'ignore',
    });
    const exited = new Promise((r) => child.on('exit', r));
    const end = Date.now() + 30_000;
    while ((await mountsUnder(cache)).length === 0 && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
    const held = await mountsUnder(cache);
    assert.equal(held.length, 1, 'the stage never got its tmpfs');
    child.kill('SIGKILL');
    await exited;
    // What kill -9 leaves: the mount (nothing ran to unmount it) …
    assert.deepEqual(await mountsUnder(cache), held);
    // … which the next build, of anything, unmounts and removes before it starts.
    const r = await build(dir, await probeSpec(dir, '{}'));
    assert.equal(r.where, 'tmpfs');
  });
});
