import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { copyHashed } from '../../src/engine/publish.js';

test('copyHashed: same bytes and sha256, runs of zeros left as holes (data at odd offsets and a trailing hole kept)', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-copyhashed-'));
  const MiB = 1024 * 1024;
  const src = Buffer.alloc(9 * MiB + 12345);
  src.write('start', 0);
  src.fill(7, 3 * MiB - 10, 3 * MiB + 70 * 1024); // straddles a read chunk's end
  src.write('tail', 9 * MiB + 100); // inside the short last chunk
  // the last 12 KiB stay zero: a trailing hole
  const a = path.join(dir, 'a');
  const b = path.join(dir, 'b');
  await fs.writeFile(a, src);
  const got = await copyHashed(a, b);
  const copy = await fs.readFile(b);
  assert.equal(got.size, src.length);
  assert.equal(got.sha256, createHash('sha256').update(src).digest('hex'));
  assert.ok(copy.equals(src), 'the copy has the same bytes');
  const st = await fs.stat(b);
  assert.ok(st.blocks * 512 < 2 * MiB, `most of the copy is holes: ${st.blocks * 512} bytes allocated of ${st.size}`);
  // An all-zero file is one hole of the right size.
  await fs.writeFile(a, Buffer.alloc(3 * MiB));
  assert.equal((await copyHashed(a, b)).size, 3 * MiB);
  assert.equal((await fs.stat(b)).size, 3 * MiB);
  await fs.rm(dir, { recursive: true, force: true });
});
