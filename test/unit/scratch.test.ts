// Where a stage's work dir goes (src/engine/scratch.ts): the pure choice between a
// tmpfs and the disk, and the /proc/meminfo and PIPELINE_SCRATCH parsing behind it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chooseScratch, memAvailable, parseSize } from '../../src/engine/scratch.js';

const GiB = 1024 ** 3;
const base = { want: 1.5 * GiB, memAvailable: 20 * GiB, reserved: 0, mode: undefined as string | undefined, root: true };

test('RAM when there is twice the estimate to spare; the tmpfs may grow to all of it but a margin', () => {
  const c = chooseScratch(base);
  assert.equal(c.memory, true);
  assert.equal(c.size, 19 * GiB);
});

test('disk when the kind declares nothing, PIPELINE_SCRATCH=disk, not root, or no meminfo', () => {
  assert.equal(chooseScratch({ ...base, want: undefined }).memory, false);
  assert.match(chooseScratch({ ...base, mode: 'disk' }).why, /PIPELINE_SCRATCH=disk/);
  assert.match(chooseScratch({ ...base, root: false }).why, /root/);
  assert.equal(chooseScratch({ ...base, memAvailable: undefined }).memory, false);
});

test('disk when available memory, less what running stages hold and a margin, is under twice the estimate', () => {
  // 4 GiB available, 1 GiB margin: 3 GiB of room = exactly twice 1.5 GiB.
  assert.equal(chooseScratch({ ...base, memAvailable: 4 * GiB }).memory, true);
  assert.equal(chooseScratch({ ...base, memAvailable: 4 * GiB - 1 }).memory, false);
  const held = chooseScratch({ ...base, memAvailable: 6 * GiB, reserved: 2.5 * GiB });
  assert.equal(held.memory, false);
  assert.match(held.why, /held by running stages/);
});

test('PIPELINE_SCRATCH=<size> caps the tmpfs; a cap under twice the estimate means disk; nonsense means disk', () => {
  const capped = chooseScratch({ ...base, mode: '4G' });
  assert.deepEqual([capped.memory, capped.size], [true, 4 * GiB]);
  assert.match(chooseScratch({ ...base, mode: '2G' }).why, /PIPELINE_SCRATCH=2G is less than twice/);
  assert.equal(chooseScratch({ ...base, mode: 'auto' }).memory, true);
  assert.match(chooseScratch({ ...base, mode: 'memory' }).why, /not auto, disk or a size/);
});

test('sizes and MemAvailable parse', () => {
  assert.equal(parseSize('4G'), 4 * GiB);
  assert.equal(parseSize('512m'), 512 * 1024 ** 2);
  assert.equal(parseSize('100'), 100);
  assert.equal(parseSize('1.5G'), undefined);
  assert.equal(parseSize(undefined), undefined);
  assert.equal(memAvailable('MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   22000000 kB\n'), 22000000 * 1024);
  assert.equal(memAvailable('MemTotal: 1 kB\n'), undefined);
});
