// FreeBSD pkg repository format, pure logic (no I/O): what `pkg repo` writes
// (libpkg pkg_repo_create.c, pkg-repository(5)) and what a pkg client checks.
//
// A repository is
//   meta.conf          UCL: version 2, packing format and catalogue names
//   packagesite.pkg    tar: [signature entries] + packagesite.yaml (one compact JSON manifest per line)
//   data.pkg           tar: [signature entries] + data ({"groups":[],"expired_packages":[],"packages":[…]})
//   All/<name>-<version>.pkg, each catalogue entry carrying its `sum` and `pkgsize`.
//
// Signatures (pkgsign_ossl.c): the signed message is the 64-char lowercase hex
// SHA-256 of the *uncompressed* catalogue file; RSA PKCS#1 v1.5 with SHA-256 over
// that string. `signature` serves clients with `signature_type: pubkey`;
// `<catalogue>.sig` + `<catalogue>.pub` serve `signature_type: fingerprints`.
import { createHash } from 'node:crypto';
import { encodeHeader, END_OF_ARCHIVE, normalizePath, padding, parseNumber, parsePax, TarError } from '../tarfs.js';

export const CATALOGUES = [
  { archive: 'packagesite', member: 'packagesite.yaml' },
  { archive: 'data', member: 'data' },
] as const;

/** Compression of the catalogue archives, with the meta.conf `packing_format` name pkg uses for it. */
export type Packing = 'tgz' | 'tar';

/** A package manifest as found in +COMPACT_MANIFEST / +MANIFEST (JSON, which UCL reads). */
export type Manifest = Record<string, unknown> & { name: string; origin: string; version: string };

const sha256 = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

/** What pkg signs for a catalogue: the lowercase hex SHA-256 of its bytes. */
export const signedMessage = (catalogue: Buffer): string => sha256(catalogue);

/** A package file's `sum`: plain hex SHA-256, the digest form every pkg version accepts. */
export const pkgSum = (bytes: Buffer): string => sha256(bytes);

/** The fingerprint of a public key as pkg computes it: SHA-256 hex of the PEM bytes as shipped. */
export const keyFingerprint = (pubPem: Buffer | string): string => sha256(pubPem);

/** A file for the client's `trusted/` directory (UCL). */
export const fingerprintFile = (hex: string): string => `function: "sha256"\nfingerprint: "${hex}"\n`;

/** Parse a trusted/ fingerprint file; undefined when it is not one. */
export function parseFingerprintFile(text: string): string | undefined {
  const fn = /\bfunction\s*[:=]\s*"?([A-Za-z0-9]+)"?/i.exec(text)?.[1];
  const fp = /\bfingerprint\s*[:=]\s*"?([0-9a-fA-F]{64})"?/i.exec(text)?.[1];
  if (!fn || fn.toLowerCase() !== 'sha256' || !fp) return undefined;
  return fp.toLowerCase();
}

// ---------------------------------------------------------------- meta.conf

export function metaConf(packing: Packing): string {
  // The fields pkg_repo_meta_to_ucl writes for a version 2 repository without a file list.
  return [
    'version = 2;',
    `packing_format = "${packing}";`,
    'manifests = "packagesite.yaml";',
    'data = "data";',
    'manifests_archive = "packagesite";',
    'data_archive = "data";',
    '',
  ].join('\n');
}

/** The `key = value;` pairs of a meta.conf (flat UCL, as pkg writes it). */
export function parseMetaConf(text: string): Record<string, string | number> {
  const out: Record<string, string | number> = {};
  for (const line of text.split('\n')) {
    const m = /^\s*([a-z_]+)\s*[=:]\s*(?:"([^"]*)"|(-?\d+))\s*;?\s*$/.exec(line);
    if (m) out[m[1]!] = m[2] !== undefined ? m[2] : Number(m[3]);
  }
  return out;
}

// ---------------------------------------------------------------- catalogue

/** Fields pkg puts first, in the order pkg_emit_object writes them; the rest follow in manifest order. */
const HEAD_FIELDS = ['name', 'origin', 'version', 'comment', 'maintainer', 'www', 'abi', 'arch', 'prefix', 'sum', 'flatsize', 'path', 'repopath', 'licenselogic', 'licenses', 'pkgsize', 'vital', 'desc'];
/** What a catalogue never carries (file lists belong to the optional filesite). */
const DROPPED = new Set(['files', 'directories', 'scripts', 'lua_scripts', 'config', 'messages']);
const NAME_RE = /^[A-Za-z0-9_+.@-][A-Za-z0-9_+.@,-]*$/;
const ORIGIN_RE = /^[A-Za-z0-9_+.-]+\/[A-Za-z0-9_+.,@-]+$/;

/** Check a manifest's identity fields; the error names what is wrong. */
export function checkManifest(m: unknown, where: string): Manifest {
  if (!m || typeof m !== 'object' || Array.isArray(m)) throw new Error(`${where}: manifest is not an object`);
  const o = m as Record<string, unknown>;
  for (const k of ['name', 'origin', 'version'] as const) {
    if (typeof o[k] !== 'string' || !o[k]) throw new Error(`${where}: manifest has no "${k}"`);
  }
  if (!NAME_RE.test(o.name as string) || !NAME_RE.test(o.version as string)) throw new Error(`${where}: manifest name/version ${JSON.stringify(`${o.name}-${o.version}`)} is not a safe file name`);
  if (!ORIGIN_RE.test(o.origin as string)) throw new Error(`${where}: manifest origin ${JSON.stringify(o.origin)} is not category/port`);
  return o as Manifest;
}

/** Where a package lives in the repository. */
export const repoPath = (m: Manifest): string => `All/${m.name}-${m.version}.pkg`;

/** One catalogue entry: the package's compact manifest plus where it is and what its bytes hash to. */
export function catalogueEntry(m: Manifest, file: { sum: string; pkgsize: number }): Record<string, unknown> {
  const path = repoPath(m);
  const merged: Record<string, unknown> = { ...m, sum: file.sum, pkgsize: file.pkgsize, path, repopath: path };
  const out: Record<string, unknown> = {};
  for (const k of HEAD_FIELDS) if (merged[k] !== undefined) out[k] = merged[k];
  for (const [k, v] of Object.entries(merged)) if (!(k in out) && !DROPPED.has(k)) out[k] = v;
  return out;
}

/** Entries sorted by repository path: the order never depends on the input listing. */
export function sortEntries<T extends Record<string, unknown>>(entries: T[]): T[] {
  const key = (e: T) => String(e.repopath);
  const sorted = [...entries].sort((a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0));
  for (let i = 1; i < sorted.length; i++) {
    if (key(sorted[i]!) === key(sorted[i - 1]!)) throw new Error(`two packages are both ${key(sorted[i]!)}`);
  }
  return sorted;
}

export const packagesiteYaml = (entries: Record<string, unknown>[]): Buffer =>
  Buffer.from(entries.map((e) => JSON.stringify(e) + '\n').join(''), 'utf8');

export const dataCatalogue = (entries: Record<string, unknown>[]): Buffer =>
  Buffer.from(JSON.stringify({ groups: [], expired_packages: [], packages: entries }), 'utf8');

/** Parse packagesite.yaml back into entries (one JSON object per non-empty line). */
export function parsePackagesite(text: string): Record<string, unknown>[] {
  return text
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l, i) => {
      try {
        return JSON.parse(l) as Record<string, unknown>;
      } catch {
        throw new Error(`packagesite.yaml line ${i + 1} is not JSON`);
      }
    });
}

// ---------------------------------------------------------------- signatures

export interface CatalogueSignature {
  /** Raw RSA signature bytes. */
  signature: Buffer;
  /** The signer's public key (PEM) as shipped in `<name>.pub`, when known. */
  pub?: Buffer;
}

/** The archive members for a signed catalogue, signature entries first as pkg writes them. */
export function catalogueMembers(member: string, data: Buffer, sig: CatalogueSignature | undefined): TarMember[] {
  const out: TarMember[] = [];
  if (sig) {
    out.push({ name: 'signature', data: sig.signature });
    if (sig.pub) {
      out.push({ name: `${member}.sig`, data: sig.signature });
      out.push({ name: `${member}.pub`, data: sig.pub });
    }
  }
  out.push({ name: member, data });
  return out;
}

/**
 * Parse what a signing_command prints (pkg_repo_sign in pkg_repo_create.c): lines
 * `SIGNATURE`, the raw signature and a newline, `CERT`, the public key, `END`;
 * an optional `TYPE` section names a non-RSA signer.
 */
export function parseSigningOutput(out: Buffer): { signature: Buffer; cert: Buffer; type: string } {
  const sections: Record<string, Buffer[]> = {};
  let cur: Buffer[] | undefined;
  let pos = 0;
  let ended = false;
  while (pos < out.length) {
    const nl = out.indexOf(0x0a, pos);
    const end = nl === -1 ? out.length : nl + 1;
    const line = out.subarray(pos, end);
    pos = end;
    const s = line.toString('latin1');
    if (s === 'SIGNATURE\n' || s === 'CERT\n' || s === 'TYPE\n') {
      cur = sections[s.trim()] = [];
      continue;
    }
    if (s === 'END\n' || s === 'END') {
      ended = true;
      break;
    }
    cur?.push(line);
  }
  if (!ended) throw new Error('signing command output has no END line');
  const sig = Buffer.concat(sections.SIGNATURE ?? []);
  // The signature is followed by one newline that is not part of it.
  const signature = sig.length > 0 && sig[sig.length - 1] === 0x0a ? sig.subarray(0, -1) : sig;
  if (signature.length === 0) throw new Error('signing command printed no SIGNATURE');
  const cert = Buffer.concat(sections.CERT ?? []);
  if (cert.length === 0) throw new Error('signing command printed no CERT (public key)');
  const type = Buffer.concat(sections.TYPE ?? []).toString('utf8').trim() || 'rsa';
  return { signature, cert, type };
}

// ---------------------------------------------------------------- tar

export interface TarMember {
  name: string;
  data: Buffer;
  mode?: number;
}

/** A deterministic ustar archive: members in the given order, owner 0:0, one mtime. */
export function packTar(members: TarMember[], mtime: number): Buffer {
  const parts: Buffer[] = [];
  for (const m of members) {
    parts.push(encodeHeader({ path: m.name, type: 'file', mode: m.mode ?? 0o644, uid: 0, gid: 0, size: m.data.length, mtime }));
    parts.push(m.data, Buffer.alloc(padding(m.data.length)));
  }
  parts.push(END_OF_ARCHIVE);
  return Buffer.concat(parts);
}

/**
 * The regular-file members of an uncompressed tar held in memory, in archive order
 * (ustar prefix and PAX path applied). Names keep a leading "/" if the archive has
 * one, as pkg stores package payload paths absolute.
 */
export function unpackTar(buf: Buffer): { name: string; data: Buffer }[] {
  const out: { name: string; data: Buffer }[] = [];
  let pos = 0;
  let paxPath: string | undefined;
  let longName: string | undefined;
  while (pos + 512 <= buf.length) {
    const h = buf.subarray(pos, pos + 512);
    if (h.every((b) => b === 0)) break;
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 0x20 : h[i]!;
    if (sum !== parseNumber(h, 148, 8)) throw new TarError(`bad tar header checksum at offset ${pos}`);
    const flag = String.fromCharCode(h[156]!);
    const cstr = (o: number, l: number) => {
      const e = h.indexOf(0, o);
      return h.toString('latin1', o, e === -1 || e > o + l ? o + l : e);
    };
    let name = cstr(0, 100);
    if (h.toString('latin1', 257, 262) === 'ustar' && h[345] !== 0) name = cstr(345, 155) + '/' + name;
    const size = parseNumber(h, 124, 12);
    const dataPos = pos + 512;
    if (dataPos + size > buf.length) throw new TarError(`tar archive is truncated at offset ${dataPos}`);
    const data = buf.subarray(dataPos, dataPos + size);
    pos = dataPos + size + padding(size);
    if (flag === 'x') {
      paxPath = parsePax(data).get('path')?.toString('utf8');
      continue;
    }
    if (flag === 'g') continue;
    if (flag === 'L') {
      longName = data.toString('latin1').replace(/\0+$/, '');
      continue;
    }
    const full = paxPath ?? longName ?? name;
    paxPath = longName = undefined;
    if (flag !== '0' && flag !== '\0') continue;
    normalizePath(full); // refuses ".."
    out.push({ name: full, data });
  }
  return out;
}

// ---------------------------------------------------------------- packages

export interface PkgFileSpec {
  /** Installed path relative to the prefix, or absolute. */
  path: string;
  content: string | Buffer;
  mode?: number;
}

/**
 * A package file in the layout `pkg create` writes: +COMPACT_MANIFEST, then
 * +MANIFEST (with the file list and each file's sha256), then the payload under
 * absolute paths. Uncompressed tar; the caller compresses.
 */
export function packPkg(manifest: Manifest, files: PkgFileSpec[], mtime: number): Buffer {
  const prefix = typeof manifest.prefix === 'string' ? manifest.prefix : '/usr/local';
  const payload = files
    .map((f) => ({ abs: f.path.startsWith('/') ? f.path : `${prefix.replace(/\/$/, '')}/${f.path}`, data: Buffer.isBuffer(f.content) ? f.content : Buffer.from(f.content, 'utf8'), mode: f.mode ?? 0o644 }))
    .sort((a, b) => (a.abs < b.abs ? -1 : a.abs > b.abs ? 1 : 0));
  const flatsize = payload.reduce((n, f) => n + f.data.length, 0);
  const compact: Record<string, unknown> = { ...manifest, prefix, flatsize };
  delete compact.files;
  const full: Record<string, unknown> = { ...compact, files: Object.fromEntries(payload.map((f) => [f.abs, `1$${sha256(f.data)}`])) };
  return packTar(
    [
      { name: '+COMPACT_MANIFEST', data: Buffer.from(JSON.stringify(compact)) },
      { name: '+MANIFEST', data: Buffer.from(JSON.stringify(full)) },
      ...payload.map((f) => ({ name: f.abs, data: f.data, mode: f.mode })),
    ],
    mtime,
  );
}

/** The manifest of a package (uncompressed tar bytes): +COMPACT_MANIFEST if present, else +MANIFEST. */
export function pkgManifest(tar: Buffer, where: string): Manifest {
  const members = unpackTar(tar);
  const pick = members.find((m) => m.name === '+COMPACT_MANIFEST') ?? members.find((m) => m.name === '+MANIFEST');
  if (!pick) throw new Error(`${where}: no +COMPACT_MANIFEST or +MANIFEST member (not a pkg package)`);
  let parsed: unknown;
  try {
    parsed = JSON.parse(pick.data.toString('utf8'));
  } catch {
    throw new Error(`${where}: ${pick.name} is not JSON (UCL-only manifests are not read)`);
  }
  return checkManifest(parsed, where);
}

/** Compression of a file by its magic bytes. */
export function sniffCompression(head: Buffer): 'gzip' | 'zstd' | 'xz' | 'bzip2' | 'none' {
  if (head[0] === 0x1f && head[1] === 0x8b) return 'gzip';
  if (head.length >= 4 && head.readUInt32LE(0) === 0xfd2fb528) return 'zstd';
  if (head.subarray(0, 6).equals(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))) return 'xz';
  if (head.subarray(0, 3).toString('latin1') === 'BZh') return 'bzip2';
  return 'none';
}
