// Writing and checking a pkg repository directory (the I/O around format.ts and
// sign.ts). Decompressing formats Node has no codec for (zstd, xz) is injected by
// the caller: a stage runs its tools through ctx.exec, the CLI through its own runner.
import { copyFile, chmod, mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { gunzipSync, gzipSync } from 'node:zlib';
import { join } from 'node:path';
import {
  CATALOGUES,
  catalogueEntry,
  catalogueMembers,
  dataCatalogue,
  fingerprintFile,
  keyFingerprint,
  metaConf,
  packagesiteYaml,
  packTar,
  parseMetaConf,
  parsePackagesite,
  pkgManifest,
  pkgSum,
  signedMessage,
  sniffCompression,
  sortEntries,
  unpackTar,
  type CatalogueSignature,
  type Packing,
} from './format.js';
import { checkSignature, type Signer } from './sign.js';

/** Files next to the catalogue: the public key and the fingerprint file for a client's trusted/ dir. */
export const PUBKEY_FILE = 'repo.pub';
export const FINGERPRINT_FILE = 'repo.fingerprint';

/** Turns compressed bytes into an uncompressed tar; gzip and plain tar are handled here. */
export type Decompress = (bytes: Buffer, format: 'zstd' | 'xz' | 'bzip2', what: string) => Promise<Buffer>;

export async function toTar(bytes: Buffer, what: string, other?: Decompress): Promise<Buffer> {
  const c = sniffCompression(bytes.subarray(0, 8));
  if (c === 'none') return bytes;
  if (c === 'gzip') return gunzipSync(bytes);
  if (!other) throw new Error(`${what} is ${c}-compressed and no ${c} decompressor is available`);
  return other(bytes, c, what);
}

/**
 * A Decompress that runs the zstd CLI (which also reads xz where built with lzma,
 * as Debian's is) on files in `tmpDir`: `run` is ctx.exec in a stage.
 */
export function zstdDecompressor(run: (cmd: string, args: string[]) => Promise<unknown>, tmpDir: string): Decompress {
  let n = 0;
  return async (bytes, format) => {
    if (format === 'bzip2') throw new Error('bzip2-compressed packages (tbz) are not read; repack them as tzst, txz or tgz');
    const src = join(tmpDir, `pkg-${++n}.${format}`);
    const dst = `${src}.tar`;
    await writeFile(src, bytes);
    await run('zstd', ['-d', '-q', '-f', `--format=${format}`, '-o', dst, src]);
    return readFile(dst);
  };
}

export interface BuildRepoOptions {
  /** Package files (any compression pkg reads). */
  packages: string[];
  outDir: string;
  /** mtime of every archive member and written file (SOURCE_DATE_EPOCH). */
  mtime: number;
  packing: Packing;
  signer: Signer;
  decompress?: Decompress;
  log?: (line: string) => void;
}

export interface BuiltRepo {
  packages: { name: string; version: string; origin: string; sum: string; path: string }[];
  fingerprint: string;
}

export async function buildRepo(o: BuildRepoOptions): Promise<BuiltRepo> {
  const read = await Promise.all(
    o.packages.map(async (file) => {
      const bytes = await readFile(file);
      const manifest = pkgManifest(await toTar(bytes, file, o.decompress), file);
      return { file, entry: catalogueEntry(manifest, { sum: pkgSum(bytes), pkgsize: bytes.length }) };
    }),
  );
  const byPath = new Map(read.map((r) => [String(r.entry.repopath), r.file]));
  const entries = sortEntries(read.map((r) => r.entry));
  await mkdir(join(o.outDir, 'All'));
  for (const e of entries) {
    const dst = join(o.outDir, String(e.repopath));
    await copyFile(byPath.get(String(e.repopath))!, dst);
    await chmod(dst, 0o644);
    o.log?.(`${e.repopath}  sum ${e.sum}`);
  }
  const contents: Record<string, Buffer> = { packagesite: packagesiteYaml(entries), data: dataCatalogue(entries) };
  let pub: Buffer | undefined;
  for (const c of CATALOGUES) {
    const data = contents[c.archive]!;
    const sig: CatalogueSignature = await o.signer.sign(signedMessage(data));
    if (!sig.pub) throw new Error('signer gave no public key');
    if (pub && !pub.equals(sig.pub)) throw new Error('the two catalogues were signed with different keys');
    pub = sig.pub;
    const tar = packTar(catalogueMembers(c.member, data, sig), o.mtime);
    // gzip from node:zlib: fixed level, no name, mtime 0 in the header, so the bytes are a function of the tar.
    await writeFile(join(o.outDir, `${c.archive}.pkg`), o.packing === 'tgz' ? gzipSync(tar, { level: 9 }) : tar, { mode: 0o644 });
  }
  await writeFile(join(o.outDir, 'meta.conf'), metaConf(o.packing), { mode: 0o644 });
  const fingerprint = keyFingerprint(pub!);
  await writeFile(join(o.outDir, PUBKEY_FILE), pub!, { mode: 0o644 });
  await writeFile(join(o.outDir, FINGERPRINT_FILE), fingerprintFile(fingerprint), { mode: 0o644 });
  return {
    packages: entries.map((e) => ({ name: String(e.name), version: String(e.version), origin: String(e.origin), sum: String(e.sum), path: String(e.repopath) })),
    fingerprint,
  };
}

// ---------------------------------------------------------------- verify

export type VerifyCode = 'format' | 'unsigned' | 'wrong-key' | 'tampered' | 'untrusted' | 'missing-package' | 'sum-mismatch';

export class RepoVerifyError extends Error {
  constructor(
    readonly code: VerifyCode,
    message: string,
  ) {
    super(message);
    this.name = 'RepoVerifyError';
  }
}

export interface Trust {
  /** `signature_type: pubkey`: the repository's public key (PEM). */
  pubkey?: Buffer;
  /** `signature_type: fingerprints`: trusted SHA-256 fingerprints (hex). */
  fingerprints?: string[];
}

export interface VerifiedRepo {
  packages: number;
  signer: string;
}

const fail = (code: VerifyCode, msg: string): never => {
  throw new RepoVerifyError(code, msg);
};

/** Check a repository directory the way a pkg client does before trusting it, offline. */
export async function verifyRepo(dir: string, trust: Trust, decompress?: Decompress): Promise<VerifiedRepo> {
  if (!trust.pubkey === !trust.fingerprints) throw new Error('give exactly one of a public key or fingerprints');
  const meta = parseMetaConf(await readFile(join(dir, 'meta.conf'), 'utf8').catch(() => fail('format', `${dir}: no meta.conf (not a pkg repository)`)));
  if (meta.version !== 2) fail('format', `meta.conf: version ${meta.version ?? '(none)'} is not 2`);
  const names: Record<string, { archive: string; member: string }> = {
    packagesite: { archive: String(meta.manifests_archive ?? 'packagesite'), member: String(meta.manifests ?? 'packagesite.yaml') },
    data: { archive: String(meta.data_archive ?? 'data'), member: String(meta.data ?? 'data') },
  };
  const catalogue: Record<string, Buffer> = {};
  let signer = '';
  for (const [which, n] of Object.entries(names)) {
    const file = `${n.archive}.pkg`;
    const raw = await readFile(join(dir, file)).catch(() => fail('format', `${file} is missing`));
    let members: { name: string; data: Buffer }[];
    try {
      members = unpackTar(await toTar(raw, file, decompress));
    } catch (e) {
      return fail('format', `${file}: cannot read archive: ${(e as Error).message}`);
    }
    const get = (name: string) => members.find((m) => m.name === name)?.data;
    const data = get(n.member) ?? fail('format', `${file} has no ${n.member} member`);
    const message = signedMessage(data);
    let pub: Buffer;
    let sig: Buffer;
    if (trust.pubkey) {
      sig = get('signature') ?? get(`${n.member}.sig`) ?? fail('unsigned', `${file} carries no signature`);
      pub = trust.pubkey;
      signer = `public key ${keyFingerprint(pub).slice(0, 16)}…`;
    } else {
      sig = get(`${n.member}.sig`) ?? fail('unsigned', `${file} carries no ${n.member}.sig (a fingerprint-trusting client needs .sig and .pub)`);
      pub = get(`${n.member}.pub`) ?? fail('unsigned', `${file} carries no ${n.member}.pub`);
      const fp = keyFingerprint(pub);
      if (!trust.fingerprints!.includes(fp)) fail('untrusted', `${file} is signed by a key with fingerprint ${fp}, which is not among the trusted fingerprints`);
      signer = `trusted fingerprint ${fp}`;
    }
    const r = checkSignature(message, sig, pub);
    if (r === 'wrong-key') fail('wrong-key', `${file}: the signature was not made with the given key (wrong public key?)`);
    if (r === 'tampered') fail('tampered', `${file}: ${n.member} does not match its signature: the catalogue was altered after signing`);
    catalogue[which] = data;
  }

  const entries = parsePackagesite(catalogue.packagesite!.toString('utf8'));
  let dataPkgs: Record<string, unknown>[];
  try {
    dataPkgs = (JSON.parse(catalogue.data!.toString('utf8')) as { packages: Record<string, unknown>[] }).packages;
  } catch {
    return fail('format', 'data catalogue is not JSON');
  }
  const sums = (l: Record<string, unknown>[]) => l.map((e) => `${e.repopath} ${e.sum}`).sort().join('\n');
  if (!Array.isArray(dataPkgs) || sums(dataPkgs) !== sums(entries)) fail('format', 'packagesite.yaml and data list different packages or sums');

  for (const e of entries) {
    const rel = String(e.repopath ?? e.path ?? '');
    if (!/^[A-Za-z0-9_+.@,-]+(\/[A-Za-z0-9_+.@,-]+)*$/.test(rel) || rel.split('/').includes('..')) fail('format', `catalogue entry ${e.name} has an unsafe path ${JSON.stringify(rel)}`);
    const bytes = await readFile(join(dir, rel)).catch(() => fail('missing-package', `${rel} (${e.name}-${e.version}) is in the catalogue but not in the repository`));
    const want = String(e.sum ?? '');
    // A typed sum is "<type>$<digest>"; untyped (what we write) is SHA-256 hex.
    const [type, digest] = want.includes('$') ? [want.slice(0, want.indexOf('$')), want.slice(want.indexOf('$') + 1)] : ['', want];
    if (type !== '' && type !== '1') fail('format', `${rel}: sum type ${type} is not supported by this verifier`);
    const got = pkgSum(bytes);
    if (got !== digest) fail('sum-mismatch', `${rel}: bytes do not match its sum in the catalogue (sha256 ${got}, catalogue says ${digest})`);
    if (typeof e.pkgsize === 'number' && e.pkgsize !== bytes.length) fail('sum-mismatch', `${rel}: size ${bytes.length} does not match pkgsize ${e.pkgsize}`);
  }
  return { packages: entries.length, signer };
}

/** Trusted fingerprints from a fingerprint file or a trusted/ directory of them. */
export async function loadFingerprints(path: string, parse: (t: string) => string | undefined): Promise<string[]> {
  const st = await stat(path);
  const files = st.isDirectory() ? (await readdir(path)).sort().map((f) => join(path, f)) : [path];
  const out: string[] = [];
  for (const f of files) {
    const fp = parse(await readFile(f, 'utf8'));
    if (fp) out.push(fp);
  }
  if (out.length === 0) throw new Error(`${path}: no sha256 fingerprint found`);
  return out;
}
