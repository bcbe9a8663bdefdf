import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FsVerityHasher, fsverityDescriptor, fsverityDigest, hashFile, hashStream } from '../../src/lib/digest.js';

const B = 4096;

/** Deterministic pseudo-random bytes: AES-128-CTR keystream from a fixed seed. */
function seeded(size: number, seed: number): Buffer {
  const key = createHash('sha256').update(`seed:${seed}`).digest().subarray(0, 16);
  const c = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  return Buffer.concat([c.update(Buffer.alloc(size)), c.final()]);
}

/** `fsverity digest FILE` -> hex, parsing its `sha256:<hex> FILE` line. */
function fsverityTool(file: string, salt?: Buffer): string {
  const args = ['digest', file];
  if (salt) args.push(`--salt=${salt.toString('hex')}`);
  const out = execFileSync('fsverity', args, { encoding: 'utf8' });
  const m = /^sha256:([0-9a-f]{64}) /.exec(out);
  assert.ok(m, `unexpected fsverity output: ${out}`);
  return m[1];
}

function sha256sum(file: string): string {
  return execFileSync('sha256sum', [file], { encoding: 'utf8' }).slice(0, 64);
}

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'digest-test-'));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test('known vectors from the notes', () => {
  assert.equal(fsverityDigest(Buffer.alloc(0)), '3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95');
  assert.equal(fsverityDigest(Buffer.alloc(B)), 'babc284ee4ffe7f449377fbf6692715b43aec7bc39c094a95878904d34bac97e');
});

// 128*128*B + 1 (three levels) is in the next test.
const EDGE_SIZES = [0, 1, B - 1, B, B + 1, 128 * B - 1, 128 * B, 128 * B + 1];

test('hashFile matches fsverity digest and sha256sum on edge sizes', async () => {
  await withDir(async (dir) => {
    for (const size of EDGE_SIZES) {
      const file = join(dir, `f${size}`);
      await writeFile(file, seeded(size, size));
      const got = await hashFile(file, { fsverity: true });
      assert.equal(got.size, size);
      assert.equal(got.fsverity, fsverityTool(file), `fs-verity digest, size ${size}`);
      assert.equal(got.sha256, sha256sum(file), `sha256, size ${size}`);
      const plain = await hashFile(file);
      assert.equal(plain.fsverity, undefined);
      assert.equal(plain.sha256, got.sha256);
    }
  });
});

test('multi-level tree (64 MiB + 1, helper-thread path) matches the tools', async () => {
  await withDir(async (dir) => {
    const size = 64 * 1024 * 1024 + 1; // > 128*128*4096: three tree levels
    const file = join(dir, 'big');
    const data = seeded(size, 7);
    await writeFile(file, data);
    const got = await hashFile(file, { fsverity: true });
    assert.equal(got.size, size);
    assert.equal(got.fsverity, fsverityTool(file));
    assert.equal(got.sha256, sha256sum(file));
    // The single-thread hasher agrees on the same multi-level input.
    assert.equal(fsverityDigest(data), got.fsverity);
  });
});

test('salted digests match fsverity digest --salt', async () => {
  await withDir(async (dir) => {
    for (const [size, salt] of [
      [0, Buffer.from('00', 'hex')],
      [B, Buffer.from('deadbeef', 'hex')],
      [128 * B + 1, Buffer.from('0123456789abcdef', 'hex')],
      [3 * 128 * B + 17, seeded(32, 99)], // maximum salt length
      [64 * 1024 * 1024 + 5, seeded(5, 3)], // helper-thread path (>= 64 MiB)
    ] as const) {
      const file = join(dir, `s${size}`);
      await writeFile(file, seeded(size, size + 1));
      const got = await hashFile(file, { fsverity: true, salt });
      assert.equal(got.fsverity, fsverityTool(file, salt), `salted, size ${size}, salt ${salt.length} bytes`);
    }
  });
});

test('FsVerityHasher is independent of how the input is chunked', () => {
  const data = seeded(300 * B + 123, 42);
  const whole = fsverityDigest(data);
  for (const step of [1, 63, B - 1, B, B + 1, 65536 + 7]) {
    // Byte-at-a-time over 1.2 MB is slow; cover it on a prefix only.
    const input = step === 1 ? data.subarray(0, 3 * B + 5) : data;
    const h = new FsVerityHasher();
    for (let o = 0; o < input.length; o += step) h.update(input.subarray(o, o + step));
    assert.equal(h.size, input.length);
    assert.equal(h.digestHex(), step === 1 ? fsverityDigest(input) : whole, `step ${step}`);
  }
});

test('hashStream gives the same digests as hashFile', async () => {
  await withDir(async (dir) => {
    const file = join(dir, 'f');
    await writeFile(file, seeded(5 * B + 3, 5));
    const a = await hashFile(file, { fsverity: true });
    const b = await hashStream(createReadStream(file, { highWaterMark: 1000 }), { fsverity: true });
    assert.deepEqual(b, a);
  });
});

test('descriptor layout and argument checks', () => {
  const root = Buffer.alloc(32, 0xab);
  const d = fsverityDescriptor(5000, root, Buffer.from('0102', 'hex'));
  assert.equal(d.length, 256);
  assert.deepEqual([...d.subarray(0, 4)], [1, 1, 12, 2]);
  assert.equal(d.readBigUInt64LE(8), 5000n);
  assert.deepEqual(d.subarray(16, 48), root);
  assert.deepEqual(d.subarray(48, 80), Buffer.alloc(32));
  assert.deepEqual(d.subarray(80, 82), Buffer.from('0102', 'hex'));
  assert.throws(() => new FsVerityHasher({ salt: Buffer.alloc(33) }), /at most 32/);
  const h = new FsVerityHasher();
  h.digest();
  assert.throws(() => h.update(Buffer.alloc(1)), /after digest/);
});
