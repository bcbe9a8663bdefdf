// `pipeline repro` end to end, through the real CLI: two from-scratch builds in
// different surroundings, compared stage by stage.
//   - fixtures/nondeterministic.yaml has a stage that writes the wall clock and
//     host name (fixtures/kinds/wallclock.mjs): repro must fail and name it;
//   - fixtures/minimal.yaml (real mmdebstrap + dracut + ipxe) must come out
//     bit-identical. This one is slow: two full builds with empty caches.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import type { ReproReport } from '../../src/repro/compare.js';
import { FAKETIME_PID1_FILES, probeFaketime } from '../../src/repro/repro.js';
import { cli } from '../helpers/cli.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'repro-test-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const KINDS = { PIPELINE_KINDS_PATH: 'fixtures/kinds' };
const haveFaketime = (() => {
  try {
    execFileSync('faketime', ['-f', '+1d', 'true']);
    return true;
  } catch {
    return false;
  }
})();

test('what a killed faketime leaves in /dev/shm (its pid is 1 in the runner namespace) does not break the next repro', async (t) => {
  if (!haveFaketime) return t.skip('faketime is not installed');
  for (const f of FAKETIME_PID1_FILES) writeFileSync(f, 'left by a killed run');
  const r = await probeFaketime('+400d');
  assert.ok(r.ok, r.reason);
});

test('repro catches the injected nondeterminism and names the wallclock stage and its files', async () => {
  const reportFile = path.join(tmp, 'nd.json');
  const r = await cli(['repro', 'amd64', 'stamp', '-f', 'fixtures/nondeterministic.yaml', '--json', '--report', reportFile], { env: KINDS });
  assert.equal(r.code, 1, r.stderr);
  const rep = JSON.parse(r.stdout) as ReproReport;
  assert.deepEqual(JSON.parse(readFileSync(reportFile, 'utf8')), rep);
  assert.equal(rep.identical, false);
  assert.equal(rep.keysIdentical, true);
  assert.equal(rep.firstDivergent, 'clock');
  assert.deepEqual(rep.sources, ['clock']);
  assert.deepEqual(
    rep.stages.map((s) => [s.name, s.kind, s.identical]),
    [
      ['base', 'fixed-text', true],
      ['clock', 'wallclock', false],
      ['bundle', 'collect', false],
    ],
  );
  const clock = rep.stages.find((s) => s.name === 'clock')!;
  assert.deepEqual(
    clock.files.map((f) => [f.path, f.changes]),
    [
      ['clock.tar', ['content']],
      ['clock.txt', ['content']],
    ],
  );
  // "built at <ISO time> on <host>": the first 9 bytes are the same, the time is not.
  assert.ok(clock.files.find((f) => f.path === 'clock.txt')!.firstOffset! >= 9);
  const members = clock.files.find((f) => f.path === 'clock.tar')!.tar!;
  assert.deepEqual(
    members.members.map((m) => [m.name, m.attrs]),
    [
      ['base.txt', ['mtime']],
      ['clock.txt', ['content', 'mtime']],
    ],
  );
  assert.deepEqual(rep.stages.find((s) => s.name === 'bundle')!.divergentUpstream, ['clock']);
  // The published files differ too, and the report says where.
  const im = rep.images[0]!;
  assert.equal(im.variant, 'stamp');
  assert.equal(im.identical, false);
  assert.ok(im.files.some((f) => f.path === 'clock.txt' && f.changes.includes('content') && f.firstOffset! >= 9));
  // Both builds ran in different surroundings, and their trees are gone.
  assert.deepEqual(
    rep.builds.map((b) => b.umask),
    ['0022', '0077'],
  );
  assert.notEqual(rep.builds[0]!.env.TZ, rep.builds[1]!.env.TZ);
  if (haveFaketime) assert.equal(rep.clock.mode, 'faketime');
  assert.equal(rep.kept, null);
  for (const b of rep.builds) assert.equal(existsSync(b.dir), false, `${b.dir} should have been removed`);
});

test('repro --keep: the human report names the stage, and both trees stay', async (t) => {
  const reportFile = path.join(tmp, 'nd-keep.json');
  const r = await cli(['repro', 'amd64', 'stamp', '-f', 'fixtures/nondeterministic.yaml', '--keep', '--no-faketime', '--report', reportFile], { env: KINDS });
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stdout, /NOT reproducible/);
  assert.match(r.stdout, /✗ clock +wallclock .*← first divergent stage/);
  assert.match(r.stdout, /clock\.txt: content/);
  assert.match(r.stdout, /✓ base/);
  assert.match(r.stdout, /bundle .*\(downstream of clock\)/);
  const rep = JSON.parse(readFileSync(reportFile, 'utf8')) as ReproReport;
  if (rep.kept) t.after(() => rmSync(rep.kept!, { recursive: true, force: true }));
  assert.equal(rep.clock.mode, 'none');
  assert.ok(rep.kept && existsSync(rep.kept));
  assert.match(r.stdout, new RegExp(`kept both trees in ${rep.kept.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));
  for (const b of rep.builds) assert.ok(existsSync(path.join(b.dir, 'build.log')));
});

test('repro: an unknown variant is a usage error before anything is built', async () => {
  const reportFile = path.join(tmp, 'bad.json');
  const r = await cli(['repro', 'amd64', 'nope', '-f', 'fixtures/nondeterministic.yaml', '--report', reportFile], { env: KINDS });
  assert.equal(r.code, 2);
  assert.match(r.stderr, /unknown variant "nope"/);
  assert.equal(JSON.parse(readFileSync(reportFile, 'utf8')).error.includes('unknown variant'), true);
});

test('repro on the minimal fixture (real mmdebstrap, dracut, ipxe): two from-scratch builds are bit-identical', { timeout: 60 * 60 * 1000 }, async () => {
  const reportFile = path.join(tmp, 'minimal.json');
  const r = await cli(['repro', 'amd64', 'ipxe', '-f', 'fixtures/minimal.yaml', '--report', reportFile], { timeoutMs: 60 * 60 * 1000 });
  const rep = JSON.parse(readFileSync(reportFile, 'utf8')) as ReproReport;
  assert.equal(r.code, 0, `${r.stdout}\n${r.stderr}`);
  assert.equal(rep.identical, true);
  assert.equal(rep.firstDivergent, null);
  assert.deepEqual(
    rep.stages.map((s) => [s.name, s.identical]),
    [
      ['rootfs', true],
      ['initramfs', true],
      ['ipxe', true],
    ],
  );
  assert.equal(rep.images[0]!.identical, true);
  assert.match(r.stdout, /REPRODUCIBLE/);
  // faketime must not have been dropped: mmdebstrap, dracut and node all ran under it.
  if (haveFaketime) {
    assert.equal(rep.clock.mode, 'faketime', rep.clock.note);
    assert.equal(rep.builds[1]!.faketime, '+400d');
  }
});
