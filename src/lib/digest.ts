// Streaming content digests: plain sha256 and the fs-verity file digest (the value
// `fsverity digest FILE` prints, SHA-256, 4 KiB blocks, optional salt), both in
// constant memory whatever the file size.
//
// fs-verity recap (see docs/notes): data blocks and Merkle-tree blocks are hashed
// as sha256(salt zero-padded to 64 bytes ‖ 4096-byte block); hashes are packed 128
// per tree block, level by level, until one block remains; its hash is the root.
// The file digest is the plain sha256 of a 256-byte descriptor holding the size,
// root and salt.
import { createHash, type Hash } from 'node:crypto';
import * as crypto from 'node:crypto';
import { open } from 'node:fs/promises';
import { Worker } from 'node:worker_threads';

export const FSVERITY_BLOCK_SIZE = 4096;
const HASH_SIZE = 32;
const HASHES_PER_BLOCK = FSVERITY_BLOCK_SIZE / HASH_SIZE; // 128
/** SHA-256 compression block size: the salt is zero-padded to a multiple of this. */
const SHA256_BLOCK = 64;
const MAX_SALT = 32; // the descriptor has room for 32 salt bytes

// crypto.hash (one-shot, no Hash object) exists since Node 20.12; it is the cheapest
// way to hash a 4 KiB block without a salt. Fall back to createHash elsewhere.
const oneShot: ((alg: string, data: Uint8Array, enc: 'buffer') => Buffer) | undefined =
  typeof (crypto as { hash?: unknown }).hash === 'function'
    ? ((crypto as unknown as { hash: (a: string, d: Uint8Array, e: 'buffer') => Buffer }).hash)
    : undefined;

function checkSalt(salt: Uint8Array | undefined): Buffer {
  const s = salt ? Buffer.from(salt.buffer, salt.byteOffset, salt.byteLength) : Buffer.alloc(0);
  if (s.length > MAX_SALT) throw new RangeError(`fs-verity salt is ${s.length} bytes; at most ${MAX_SALT} are allowed`);
  return s;
}

/**
 * Incremental fs-verity digest (SHA-256, 4 KiB blocks). Feed bytes in any chunking
 * with update(); digest() returns the 32-byte file digest. Memory is O(tree depth).
 */
export class FsVerityHasher {
  private readonly salt: Buffer;
  /** Hash state after absorbing the padded salt, copied for every block (salted case only). */
  private readonly saltedPrefix: Hash | undefined;
  /** A partial data block carried between update() calls. */
  private readonly pending = Buffer.alloc(FSVERITY_BLOCK_SIZE);
  private pendingLen = 0;
  /** levels[i]: the tree block being filled with hashes of level-i items (i = 0: data blocks). */
  private readonly levels: Buffer[] = [];
  /** Hashes currently in levels[i]. */
  private readonly fill: number[] = [];
  /** Hashes ever pushed into level i; the first level that receives exactly one is the root. */
  private readonly pushed: number[] = [];
  private total = 0;
  private finished = false;

  constructor(opts: { salt?: Uint8Array } = {}) {
    this.salt = checkSalt(opts.salt);
    if (this.salt.length > 0) {
      const padded = Buffer.alloc(Math.ceil(this.salt.length / SHA256_BLOCK) * SHA256_BLOCK);
      this.salt.copy(padded);
      this.saltedPrefix = createHash('sha256').update(padded);
    }
  }

  /** Bytes consumed so far. */
  get size(): number {
    return this.total;
  }

  update(data: Uint8Array): this {
    if (this.finished) throw new Error('FsVerityHasher: update() after digest()');
    const len = data.byteLength;
    this.total += len;
    let off = 0;
    if (this.pendingLen > 0) {
      const take = Math.min(len, FSVERITY_BLOCK_SIZE - this.pendingLen);
      this.pending.set(data.subarray(0, take), this.pendingLen);
      this.pendingLen += take;
      off = take;
      if (this.pendingLen < FSVERITY_BLOCK_SIZE) return this;
      this.push(0, this.hashBlock(this.pending));
      this.pendingLen = 0;
    }
    // Full blocks straight from the caller's buffer: no copy, no per-block allocation
    // beyond the 32-byte digest Node returns.
    const end = off + Math.floor((len - off) / FSVERITY_BLOCK_SIZE) * FSVERITY_BLOCK_SIZE;
    for (; off < end; off += FSVERITY_BLOCK_SIZE) this.push(0, this.hashBlock(data.subarray(off, off + FSVERITY_BLOCK_SIZE)));
    if (off < len) {
      this.pending.set(data.subarray(off), 0);
      this.pendingLen = len - off;
    }
    return this;
  }

  /**
   * Account for `bytes` of data (whole blocks, at a block boundary) whose block
   * hashes were computed elsewhere with the same salt, e.g. on another thread.
   */
  addBlockHashes(hashes: Uint8Array, bytes: number): this {
    if (this.finished) throw new Error('FsVerityHasher: addBlockHashes() after digest()');
    if (this.pendingLen !== 0 || bytes % FSVERITY_BLOCK_SIZE !== 0) throw new Error('FsVerityHasher: addBlockHashes() needs whole blocks at a block boundary');
    const n = bytes / FSVERITY_BLOCK_SIZE;
    if (hashes.byteLength < n * HASH_SIZE) throw new RangeError(`addBlockHashes: ${n} hashes needed, got ${hashes.byteLength / HASH_SIZE}`);
    for (let i = 0; i < n; i++) this.push(0, hashes.subarray(i * HASH_SIZE, (i + 1) * HASH_SIZE));
    this.total += bytes;
    return this;
  }

  /** Merkle root (32 bytes; all zero for an empty file). */
  rootHash(): Buffer {
    if (!this.finished) this.finish();
    return this.root!;
  }

  /** The fs-verity file digest (32 bytes), as `fsverity digest` prints it in hex. */
  digest(): Buffer {
    return createHash('sha256').update(fsverityDescriptor(this.total, this.rootHash(), this.salt)).digest();
  }

  digestHex(): string {
    return this.digest().toString('hex');
  }

  private root: Buffer | undefined;

  private finish(): void {
    this.finished = true;
    if (this.pendingLen > 0) {
      this.pending.fill(0, this.pendingLen);
      this.push(0, this.hashBlock(this.pending));
      this.pendingLen = 0;
    }
    if (this.total === 0) {
      this.root = Buffer.alloc(HASH_SIZE);
      return;
    }
    // Flush partial tree blocks upwards until a level holds a single hash: the root.
    for (let i = 0; ; i++) {
      if (this.pushed[i] === 1) {
        this.root = Buffer.from(this.levels[i].subarray(0, HASH_SIZE));
        return;
      }
      if (this.fill[i] > 0) {
        this.levels[i].fill(0, this.fill[i] * HASH_SIZE);
        this.fill[i] = 0;
        this.push(i + 1, this.hashBlock(this.levels[i]));
      }
    }
  }

  private hashBlock(block: Uint8Array): Buffer {
    if (this.saltedPrefix) return this.saltedPrefix.copy().update(block).digest();
    if (oneShot) return oneShot('sha256', block, 'buffer');
    return createHash('sha256').update(block).digest();
  }

  private push(level: number, h: Uint8Array): void {
    if (this.levels.length <= level) {
      this.levels.push(Buffer.alloc(FSVERITY_BLOCK_SIZE));
      this.fill.push(0);
      this.pushed.push(0);
    }
    this.levels[level].set(h, this.fill[level] * HASH_SIZE);
    this.pushed[level]++;
    if (++this.fill[level] === HASHES_PER_BLOCK) {
      this.fill[level] = 0;
      this.push(level + 1, this.hashBlock(this.levels[level]));
    }
  }
}

/** The 256-byte fs_verity_descriptor whose plain sha256 is the file digest. */
export function fsverityDescriptor(size: number | bigint, rootHash: Uint8Array, salt?: Uint8Array): Buffer {
  const s = checkSalt(salt);
  if (rootHash.byteLength !== HASH_SIZE) throw new RangeError(`root hash must be ${HASH_SIZE} bytes`);
  const d = Buffer.alloc(256);
  d[0] = 1; // version
  d[1] = 1; // FS_VERITY_HASH_ALG_SHA256
  d[2] = 12; // log2(4096)
  d[3] = s.length;
  d.writeBigUInt64LE(BigInt(size), 8);
  d.set(rootHash, 16);
  s.copy(d, 80);
  return d;
}

/** fs-verity digest (hex) of an in-memory buffer. */
export function fsverityDigest(data: Uint8Array, salt?: Uint8Array): string {
  return new FsVerityHasher({ salt }).update(data).digestHex();
}

export interface FileDigests {
  size: number;
  /** Lowercase hex sha256 of the content. */
  sha256: string;
  /** Lowercase hex fs-verity digest, when requested. */
  fsverity?: string;
}

export interface HashOptions {
  fsverity?: boolean;
  salt?: Buffer;
}

/** sha256 and (optionally) fs-verity digest of bytes in memory, e.g. a file about to be written. */
export function hashBytes(data: Uint8Array, opts: HashOptions = {}): FileDigests {
  const sha256 = createHash('sha256').update(data).digest('hex');
  if (!opts.fsverity) return { size: data.byteLength, sha256 };
  return { size: data.byteLength, sha256, fsverity: new FsVerityHasher({ salt: opts.salt }).update(data).digestHex() };
}

const CHUNK = 4 << 20;
/** Below this size starting a helper thread (tens of ms) costs more than it saves. */
const PARALLEL_MIN = 64 << 20;

/** sha256 and (optionally) fs-verity digest of any async iterable of bytes, one pass. */
export async function hashStream(src: AsyncIterable<Uint8Array>, opts: HashOptions = {}): Promise<FileDigests> {
  const sha = createHash('sha256');
  const fv = opts.fsverity ? new FsVerityHasher({ salt: opts.salt }) : undefined;
  let size = 0;
  for await (const chunk of src) {
    sha.update(chunk);
    fv?.update(chunk);
    size += chunk.byteLength;
  }
  return fv ? { size, sha256: sha.digest('hex'), fsverity: fv.digestHex() } : { size, sha256: sha.digest('hex') };
}

/**
 * sha256 and (optionally) fs-verity digest of a file in one read. For big files
 * with both digests the whole-file sha256 runs on a helper thread over shared
 * read buffers while this thread does the fs-verity tree, so the combined pass
 * costs about as much as the slower of the two.
 */
export async function hashFile(path: string, opts: HashOptions = {}): Promise<FileDigests> {
  checkSalt(opts.salt);
  const fh = await open(path, 'r');
  try {
    const st = await fh.stat();
    if (opts.fsverity && st.size >= PARALLEL_MIN) return await hashParallel(fh, opts.salt);
    const sha = createHash('sha256');
    const fv = opts.fsverity ? new FsVerityHasher({ salt: opts.salt }) : undefined;
    const buf = Buffer.allocUnsafe(Math.min(CHUNK, Math.max(FSVERITY_BLOCK_SIZE, st.size + 1)));
    let size = 0;
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, size);
      if (bytesRead === 0) break;
      const view = buf.subarray(0, bytesRead);
      sha.update(view);
      fv?.update(view);
      size += bytesRead;
    }
    return fv ? { size, sha256: sha.digest('hex'), fsverity: fv.digestHex() } : { size, sha256: sha.digest('hex') };
  } finally {
    await fh.close();
  }
}

/** Lowercase hex sha256 of a file's content (streamed: disk images are gigabytes). */
export async function sha256File(path: string): Promise<string> {
  return (await hashFile(path)).sha256;
}

// Plain JS so it runs the same under tsx and from dist/ (eval'd workers skip loaders).
// Per chunk: sha256-update the whole chunk, then hash the chunk's tail blocks for
// fs-verity (salted like the main thread) into the shared result area.
const HELPER_SRC = `
const { parentPort, workerData } = require('node:worker_threads');
const crypto = require('node:crypto');
const mem = Buffer.from(workerData.sab);
const out = Buffer.from(workerData.out);
const h = crypto.createHash('sha256');
const prefix = workerData.salt ? crypto.createHash('sha256').update(Buffer.from(workerData.salt)) : null;
const one = typeof crypto.hash === 'function' ? crypto.hash : null;
const B = ${FSVERITY_BLOCK_SIZE};
parentPort.on('message', (m) => {
  if (m.end) { parentPort.postMessage({ digest: h.digest('hex') }); return; }
  h.update(mem.subarray(m.off, m.off + m.len));
  let o = m.outOff;
  for (let b = m.off + m.tail; b < m.off + m.len; b += B, o += 32) {
    const blk = mem.subarray(b, b + B);
    const d = prefix ? prefix.copy().update(blk).digest() : one ? one('sha256', blk, 'buffer') : crypto.createHash('sha256').update(blk).digest();
    d.copy(out, o);
  }
  parentPort.postMessage({ ack: true });
});
`;

type FileHandle = Awaited<ReturnType<typeof open>>;

/**
 * Share of each chunk's fs-verity block hashing given to the helper. The helper's
 * whole-chunk sha256 is cheaper than this thread's per-block hashing (one call per
 * 4 KiB), so moving ~1/8 of the blocks over evens out the two threads.
 */
const HELPER_BLOCK_SHARE = 1 / 8;

async function hashParallel(fh: FileHandle, salt: Buffer | undefined): Promise<FileDigests> {
  const SLOTS = 4;
  const OUT_PER_SLOT = (CHUNK / FSVERITY_BLOCK_SIZE) * HASH_SIZE;
  const sab = new SharedArrayBuffer(SLOTS * CHUNK);
  const outSab = new SharedArrayBuffer(SLOTS * OUT_PER_SLOT);
  const slot = (i: number) => Buffer.from(sab, (i % SLOTS) * CHUNK, CHUNK);
  const out = Buffer.from(outSab);
  let paddedSalt: Buffer | undefined;
  if (salt && salt.length > 0) {
    paddedSalt = Buffer.alloc(Math.ceil(salt.length / SHA256_BLOCK) * SHA256_BLOCK);
    salt.copy(paddedSalt);
  }
  const worker = new Worker(HELPER_SRC, { eval: true, workerData: { sab, out: outSab, salt: paddedSalt } });
  let acked = 0;
  let failure: Error | undefined;
  let wake: (() => void) | undefined;
  let finalDigest: string | undefined;
  const poke = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  worker.on('message', (m: { ack?: boolean; digest?: string }) => {
    if (m.ack) acked++;
    if (m.digest) finalDigest = m.digest;
    poke();
  });
  worker.on('error', (e) => {
    failure = e;
    poke();
  });
  worker.on('exit', (code) => {
    if (finalDigest === undefined && !failure) failure = new Error(`hashing helper thread exited with code ${code}`);
    poke();
  });
  const until = async (cond: () => boolean) => {
    while (!cond()) {
      if (failure) throw failure;
      await new Promise<void>((r) => (wake = r));
    }
    if (failure) throw failure;
  };
  try {
    const fv = new FsVerityHasher({ salt });
    let size = 0;
    let i = 0;
    // The helper's block hashes for chunk i are collected after chunk i+1 has been
    // queued, so it never idles while this thread waits.
    let owed: { chunk: number; outOff: number; bytes: number } | undefined;
    const collect = async () => {
      if (!owed) return;
      const o = owed;
      owed = undefined;
      await until(() => acked >= o.chunk + 1);
      fv.addBlockHashes(out.subarray(o.outOff, o.outOff + (o.bytes / FSVERITY_BLOCK_SIZE) * HASH_SIZE), o.bytes);
    };
    let reading = fh.read(slot(0), 0, CHUNK, 0);
    for (;;) {
      const { bytesRead } = await reading;
      if (bytesRead === 0) break;
      // Slot i+1 (data and results) is reused once chunk i+1-SLOTS is fully done.
      await until(() => acked >= i + 2 - SLOTS);
      reading = fh.read(slot(i + 1), 0, CHUNK, size + bytesRead);
      // Only whole-block chunks are split; a short (last) chunk stays on this thread.
      const blocks = bytesRead % FSVERITY_BLOCK_SIZE === 0 ? bytesRead / FSVERITY_BLOCK_SIZE : 0;
      const head = blocks > 0 ? (blocks - Math.floor(blocks * HELPER_BLOCK_SHARE)) * FSVERITY_BLOCK_SIZE : bytesRead;
      const outOff = (i % SLOTS) * OUT_PER_SLOT;
      worker.postMessage({ off: (i % SLOTS) * CHUNK, len: bytesRead, tail: head, outOff });
      await collect(); // previous chunk's tail precedes this chunk's head in the tree
      fv.update(slot(i).subarray(0, head));
      if (head < bytesRead) owed = { chunk: i, outOff, bytes: bytesRead - head };
      size += bytesRead;
      i++;
    }
    await collect();
    worker.postMessage({ end: true });
    await until(() => finalDigest !== undefined);
    return { size, sha256: finalDigest!, fsverity: fv.digestHex() };
  } finally {
    await worker.terminate();
  }
}
