// Push an OCI image layout directory (oci-layout, index.json, blobs/sha256/…) to a
// registry over the OCI distribution API, with Node's fetch and no external tools.
//
// Flow: read and check the layout locally first (every referenced blob present,
// right size; manifests hash to their digests) so a broken layout fails before any
// network traffic; ping /v2/ (reachability + auth negotiation); HEAD each blob and
// upload only the missing ones; PUT child manifests by digest and the top manifest
// by tag, checking the Docker-Content-Digest the registry echoes.
import { createHash } from 'node:crypto';
import { open, readFile, stat } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { sha256 } from '../engine/canonical.js';
import { BuildError, UsageError } from '../engine/errors.js';

// ---------------------------------------------------------------------------
// Errors: one class per failure a user has to act on differently.

export type RegistryFailure = 'unreachable' | 'auth' | 'digest-mismatch' | 'missing-blob' | 'protocol';

export class RegistryError extends BuildError {
  constructor(
    readonly reason: RegistryFailure,
    message: string,
    detail = '',
  ) {
    super(message, detail);
    this.name = 'RegistryError';
  }
}

/** The registry could not be reached at all (DNS, refused, TLS, reset). */
export class RegistryUnreachableError extends RegistryError {
  constructor(
    readonly host: string,
    readonly code: string,
    url: string,
    tlsProblem = false,
  ) {
    const hint = tlsProblem ? '; TLS failed: if this registry speaks plain http, push with insecure (http)' : '';
    super('unreachable', `registry ${host} is unreachable (${code}) at ${url}${hint}`);
    this.name = 'RegistryUnreachableError';
  }
}

/** 401/403: credentials missing or rejected. Never carries the credentials themselves. */
export class RegistryAuthError extends RegistryError {
  constructor(
    readonly host: string,
    readonly status: number,
    message: string,
  ) {
    super('auth', message);
    this.name = 'RegistryAuthError';
  }
}

export class RegistryDigestMismatchError extends RegistryError {
  constructor(
    readonly expected: string,
    readonly actual: string,
    message: string,
  ) {
    super('digest-mismatch', message);
    this.name = 'RegistryDigestMismatchError';
  }
}

/** A blob the layout references is absent or has the wrong size. */
export class LayoutBlobMissingError extends RegistryError {
  constructor(
    readonly digest: string,
    message: string,
  ) {
    super('missing-blob', message);
    this.name = 'LayoutBlobMissingError';
  }
}

export class InvalidRefError extends UsageError {
  constructor(
    readonly ref: string,
    why: string,
  ) {
    super(`invalid image reference "${ref}": ${why} (expected host[:port]/repo[:tag])`);
    this.name = 'InvalidRefError';
  }
}

// ---------------------------------------------------------------------------
// References (pure)

export interface ImageRef {
  /** host or host:port as written (the registry's identity for credentials). */
  host: string;
  repository: string;
  tag?: string;
}

const HOST_RE = /^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?$/;
const PATH_COMPONENT_RE = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const DIGEST_RE = /^sha256:[a-f0-9]{64}$/;

/** Parse host[:port]/repo[:tag]. The host part is mandatory: there is no default registry. */
export function parseRef(ref: string): ImageRef {
  if (ref.includes('@')) throw new InvalidRefError(ref, 'pushing by digest is not supported; give a tag');
  const slash = ref.indexOf('/');
  if (slash <= 0) throw new InvalidRefError(ref, 'no registry host');
  const host = ref.slice(0, slash);
  if (!HOST_RE.test(host)) throw new InvalidRefError(ref, `bad registry host "${host}"`);
  if (!host.includes('.') && !host.includes(':') && host !== 'localhost') {
    throw new InvalidRefError(ref, `"${host}" does not look like a registry host (needs a dot, a port, or localhost)`);
  }
  let rest = ref.slice(slash + 1);
  let tag: string | undefined;
  const colon = rest.lastIndexOf(':');
  if (colon >= 0) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG_RE.test(tag)) throw new InvalidRefError(ref, `bad tag "${tag}"`);
  }
  if (rest === '' || !rest.split('/').every((c) => PATH_COMPONENT_RE.test(c))) {
    throw new InvalidRefError(ref, `bad repository name "${rest}" (lowercase letters, digits, separators . _ __ -)`);
  }
  if (host.length + 1 + rest.length > 255) throw new InvalidRefError(ref, 'name longer than 255 characters');
  return { host, repository: rest, tag };
}

function hostname(host: string): string {
  if (host.startsWith('[')) return host.slice(1, host.indexOf(']'));
  const c = host.lastIndexOf(':');
  return c >= 0 ? host.slice(0, c) : host;
}

/** Docker's rule: loopback registries are spoken to over plain http. */
export function isLoopbackHost(host: string): boolean {
  const h = hostname(host).toLowerCase();
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h);
}

// ---------------------------------------------------------------------------
// Credentials

export interface Credentials {
  username: string;
  password: string;
}

interface ResolvedCreds extends Credentials {
  /** Where they came from, for error messages (never the values). */
  source: string;
}

/** Normalise a docker config auths key ("https://host/v1/", "host") to host[:port]. */
function authKeyHost(key: string): string {
  return key.replace(/^[a-z]+:\/\//i, '').replace(/\/.*$/, '').toLowerCase();
}

/** opts > PIPELINE_REGISTRY_USER/PASSWORD > $DOCKER_CONFIG/config.json or ~/.docker/config.json. */
export async function resolveCredentials(host: string, explicit?: Credentials, env: NodeJS.ProcessEnv = process.env): Promise<ResolvedCreds | undefined> {
  if (explicit) return { ...explicit, source: 'opts.auth' };
  if (env.PIPELINE_REGISTRY_USER !== undefined && env.PIPELINE_REGISTRY_PASSWORD !== undefined) {
    return { username: env.PIPELINE_REGISTRY_USER, password: env.PIPELINE_REGISTRY_PASSWORD, source: 'PIPELINE_REGISTRY_USER/PIPELINE_REGISTRY_PASSWORD' };
  }
  const dir = env.DOCKER_CONFIG || join(env.HOME || homedir(), '.docker');
  const file = join(dir, 'config.json');
  let cfg: { auths?: Record<string, { auth?: string; username?: string; password?: string }> };
  try {
    cfg = JSON.parse(await readFile(file, 'utf8'));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new RegistryError('auth', `cannot read docker config ${file}: ${(e as Error).message}`);
  }
  const want = host.toLowerCase();
  for (const [key, entry] of Object.entries(cfg.auths ?? {})) {
    if (authKeyHost(key) !== want || !entry) continue;
    if (entry.auth) {
      const dec = Buffer.from(entry.auth, 'base64').toString('utf8');
      const i = dec.indexOf(':');
      if (i < 0) throw new RegistryError('auth', `docker config ${file}: auths["${key}"].auth is not base64 of user:password`);
      return { username: dec.slice(0, i), password: dec.slice(i + 1), source: `${file} (auths["${key}"])` };
    }
    if (entry.username !== undefined && entry.password !== undefined) {
      return { username: entry.username, password: entry.password, source: `${file} (auths["${key}"])` };
    }
  }
  return undefined;
}

/** Parse a WWW-Authenticate header: scheme plus key="value" params (pure). */
export function parseChallenge(header: string): { scheme: string; params: Record<string, string> } {
  const m = /^\s*([A-Za-z]+)\s*(.*)$/s.exec(header);
  if (!m) return { scheme: '', params: {} };
  const params: Record<string, string> = {};
  const re = /([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?/g;
  for (const p of m[2].matchAll(re)) params[p[1].toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : p[3];
  return { scheme: m[1].toLowerCase(), params };
}

// ---------------------------------------------------------------------------
// Layout reading (local, before any network)

export const MT = {
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerList: 'application/vnd.docker.distribution.manifest.list.v2+json',
} as const;

export interface Descriptor {
  mediaType?: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

export interface BlobItem {
  digest: string;
  size: number;
  path: string;
  /** Small blobs (configs, manifests' companions) may be held in memory instead of read from path. */
  bytes?: Buffer;
}

interface ManifestItem {
  digest: string;
  mediaType: string;
  bytes: Buffer;
}

interface PushPlan {
  blobs: BlobItem[];
  /** Children first, top manifest last. */
  manifests: ManifestItem[];
  tag: string;
}

const isIndexType = (t: string) => t === MT.ociIndex || t === MT.dockerList;

function blobPath(layoutDir: string, digest: string, what: string): string {
  if (!DIGEST_RE.test(digest)) throw new LayoutBlobMissingError(digest, `${what}: unsupported or malformed digest "${digest}" (only sha256 is supported)`);
  return join(layoutDir, 'blobs', 'sha256', digest.slice('sha256:'.length));
}

async function planPush(layoutDir: string, wantTag: string | undefined): Promise<PushPlan> {
  let layoutVersion: string | undefined;
  try {
    layoutVersion = JSON.parse(await readFile(join(layoutDir, 'oci-layout'), 'utf8')).imageLayoutVersion;
  } catch (e) {
    throw new BuildError(`${layoutDir} is not an OCI image layout: cannot read oci-layout (${(e as Error).message})`);
  }
  if (layoutVersion !== '1.0.0') throw new BuildError(`${layoutDir}: unsupported imageLayoutVersion ${JSON.stringify(layoutVersion)}`);
  let index: { manifests?: Descriptor[] };
  try {
    index = JSON.parse(await readFile(join(layoutDir, 'index.json'), 'utf8'));
  } catch (e) {
    throw new BuildError(`${layoutDir}: cannot read index.json (${(e as Error).message})`);
  }
  const all = index.manifests ?? [];
  const REF = 'org.opencontainers.image.ref.name';
  // The ref's tag picks the manifest named so in index.json; a single-image layout
  // is pushed under whatever tag the ref gives, or under its own ref.name.
  let top: Descriptor | undefined;
  if (wantTag !== undefined) top = all.find((d) => d.annotations?.[REF] === wantTag) ?? (all.length === 1 ? all[0] : undefined);
  else if (all.length === 1) top = all[0];
  if (!top) {
    const names = all.map((d) => d.annotations?.[REF] ?? d.digest).join(', ') || 'none';
    throw new BuildError(
      wantTag !== undefined
        ? `${layoutDir}/index.json has no manifest named "${wantTag}" (it has: ${names})`
        : `${layoutDir}/index.json has ${all.length} manifests (${names}); give a tag to choose one`,
    );
  }
  const tag = wantTag ?? top.annotations?.[REF] ?? 'latest';
  if (!TAG_RE.test(tag)) throw new InvalidRefError(tag, `tag "${tag}" from index.json is not a valid tag`);

  const blobs = new Map<string, BlobItem>();
  const manifests: ManifestItem[] = [];
  const seen = new Set<string>();

  const addBlob = async (d: Descriptor, what: string) => {
    const path = blobPath(layoutDir, d.digest, what);
    let size: number;
    try {
      size = (await stat(path)).size;
    } catch {
      throw new LayoutBlobMissingError(d.digest, `${what} ${d.digest} is missing from the layout (expected ${path})`);
    }
    if (size !== d.size) throw new LayoutBlobMissingError(d.digest, `${what} ${d.digest} in the layout is ${size} bytes, the descriptor says ${d.size}`);
    blobs.set(d.digest, { digest: d.digest, size, path });
  };

  const visit = async (d: Descriptor, what: string): Promise<void> => {
    if (seen.has(d.digest)) return;
    seen.add(d.digest);
    const path = blobPath(layoutDir, d.digest, what);
    let bytes: Buffer;
    try {
      bytes = await readFile(path);
    } catch {
      throw new LayoutBlobMissingError(d.digest, `${what} ${d.digest} is missing from the layout (expected ${path})`);
    }
    const actual = 'sha256:' + sha256(bytes);
    if (actual !== d.digest) throw new RegistryDigestMismatchError(d.digest, actual, `${what} ${path} hashes to ${actual}, not ${d.digest}: the layout is corrupt`);
    let doc: { mediaType?: string; config?: Descriptor; layers?: Descriptor[]; manifests?: Descriptor[] };
    try {
      doc = JSON.parse(bytes.toString('utf8'));
    } catch {
      throw new BuildError(`${what} ${d.digest} is not JSON`);
    }
    const mediaType = d.mediaType ?? doc.mediaType ?? (doc.manifests ? MT.ociIndex : MT.ociManifest);
    if (isIndexType(mediaType)) {
      for (const [i, child] of (doc.manifests ?? []).entries()) await visit(child, `manifest ${i} of index ${d.digest.slice(7, 19)}`);
    } else {
      if (!doc.config) throw new BuildError(`manifest ${d.digest} has no config`);
      await addBlob(doc.config, 'config');
      for (const [i, l] of (doc.layers ?? []).entries()) await addBlob(l, `layer ${i}`);
    }
    manifests.push({ digest: d.digest, mediaType, bytes });
  };
  await visit(top, 'manifest');
  return { blobs: [...blobs.values()], manifests, tag };
}

// ---------------------------------------------------------------------------
// HTTP client with auth negotiation

export interface PushOptions {
  /** true: plain http; false: https. Default: http for loopback hosts, https otherwise. */
  insecure?: boolean;
  auth?: Credentials;
  /** Blobs up to this size go in one PUT; bigger ones in PATCH chunks of this size. Default 16 MiB. */
  chunkSize?: number;
  log?: (line: string) => void;
  signal?: AbortSignal;
  /** Per-request bound (ms): a registry that stops answering fails instead of hanging. Default: none. */
  timeoutMs?: number;
}

export interface PushResult {
  /** Digest of the manifest (or index) the tag now points to. */
  digest: string;
  /** Blob digests uploaded. */
  pushed: string[];
  /** Blob digests the registry already had. */
  skipped: string[];
}

export class RegistryClient {
  private authorization: string | undefined;
  private credsLoaded = false;
  private creds: ResolvedCreds | undefined;

  constructor(
    readonly base: string,
    readonly host: string,
    readonly repository: string,
    private readonly opts: PushOptions,
  ) {}

  private async credentials(): Promise<ResolvedCreds | undefined> {
    if (!this.credsLoaded) {
      this.creds = await resolveCredentials(this.host, this.opts.auth);
      this.credsLoaded = true;
    }
    return this.creds;
  }

  private authError(status: number, extra = ''): RegistryAuthError {
    const c = this.creds;
    const what = c ? `rejected the credentials from ${c.source}` : 'requires credentials and none were found (opts, PIPELINE_REGISTRY_USER/PIPELINE_REGISTRY_PASSWORD, or docker config.json)';
    const verb = status === 403 ? 'denied access' : 'refused authentication';
    return new RegistryAuthError(this.host, status, `registry ${this.host} ${verb} (HTTP ${status}) for ${this.repository}: it ${what}${extra}`);
  }

  private async rawFetch(url: string, init: RequestInit): Promise<Response> {
    const t = this.opts.timeoutMs;
    const signal = t ? (this.opts.signal ? AbortSignal.any([this.opts.signal, AbortSignal.timeout(t)]) : AbortSignal.timeout(t)) : this.opts.signal;
    try {
      return await fetch(url, { ...init, redirect: 'follow', signal });
    } catch (e) {
      if (this.opts.signal?.aborted) throw e;
      const err = e as Error & { cause?: { code?: string; message?: string } };
      const code = err.name === 'TimeoutError' ? `no answer within ${t} ms` : (err.cause?.code ?? err.cause?.message ?? err.message);
      throw new RegistryUnreachableError(this.host, code, new URL(url).origin, url.startsWith('https:') && /SSL|TLS|CERT|EPROTO/i.test(code));
    }
  }

  /** Answer a 401 challenge: Basic → send credentials; Bearer → fetch a token. */
  private async authenticate(res: Response): Promise<void> {
    const header = res.headers.get('www-authenticate') ?? '';
    const { scheme, params } = parseChallenge(header);
    const creds = await this.credentials();
    const basic = creds ? 'Basic ' + Buffer.from(`${creds.username}:${creds.password}`).toString('base64') : undefined;
    if (scheme === 'basic') {
      if (!basic) throw this.authError(401);
      this.authorization = basic;
      return;
    }
    if (scheme !== 'bearer' || !params.realm) throw this.authError(401, ` (unsupported challenge "${header.split(' ')[0]}")`);
    const realm = new URL(params.realm);
    if (params.service) realm.searchParams.set('service', params.service);
    const scopes = new Set([`repository:${this.repository}:pull,push`]);
    if (params.scope) for (const s of params.scope.split(' ')) scopes.add(s);
    for (const s of scopes) realm.searchParams.append('scope', s);
    const tokRes = await this.rawFetch(realm.toString(), { headers: basic ? { authorization: basic } : {} });
    if (tokRes.status === 401 || tokRes.status === 403) {
      await tokRes.body?.cancel();
      throw this.authError(tokRes.status, ` (token service ${realm.origin})`);
    }
    if (!tokRes.ok) throw new RegistryError('auth', `token service ${realm.origin} for registry ${this.host} answered HTTP ${tokRes.status}`);
    const body = (await tokRes.json()) as { token?: string; access_token?: string };
    const token = body.token ?? body.access_token;
    if (!token) throw new RegistryError('auth', `token service ${realm.origin} for registry ${this.host} returned no token`);
    this.authorization = `Bearer ${token}`;
  }

  /** A request that negotiates auth once on 401 and maps 401/403 to RegistryAuthError. */
  async request(method: string, pathOrUrl: string, init: { headers?: Record<string, string>; body?: Buffer } = {}): Promise<Response> {
    const url = new URL(pathOrUrl, this.base).toString();
    for (let attempt = 0; ; attempt++) {
      const headers: Record<string, string> = { ...init.headers };
      // Upload Locations may point elsewhere (storage backends): credentials stay with the registry.
      if (this.authorization && new URL(url).origin === new URL(this.base).origin) headers.authorization = this.authorization;
      // Buffer is a Uint8Array; the fetch typings only want the ArrayBuffer-backed flavour spelled out.
      const res = await this.rawFetch(url, { method, headers, body: init.body as Uint8Array<ArrayBuffer> | undefined });
      if (res.status === 401 && attempt === 0) {
        await res.body?.cancel();
        await this.authenticate(res);
        continue;
      }
      if (res.status === 401 || res.status === 403) {
        await res.body?.cancel();
        throw this.authError(res.status);
      }
      return res;
    }
  }

  async fail(res: Response, what: string): Promise<never> {
    let detail = '';
    try {
      detail = (await res.text()).slice(0, 2000);
    } catch {
      /* body already gone */
    }
    let codes = '';
    try {
      const j = JSON.parse(detail) as { errors?: { code?: string; message?: string }[] };
      codes = (j.errors ?? []).map((e) => `${e.code}: ${e.message}`).join('; ');
    } catch {
      /* not a registry error body */
    }
    throw new RegistryError('protocol', `registry ${this.host}: ${what} failed with HTTP ${res.status}${codes ? ` (${codes})` : ''}`, detail);
  }
}

export function checkEchoedDigest(res: Response, expected: string, what: string, host: string, log: (l: string) => void): void {
  const got = res.headers.get('docker-content-digest');
  if (got === null) {
    log(`registry ${host} sent no Docker-Content-Digest for ${what}; relying on its own digest check`);
    return;
  }
  if (got !== expected) {
    throw new RegistryDigestMismatchError(expected, got, `registry ${host} stored ${what} as ${got}, but the local digest is ${expected}`);
  }
}

async function readRange(path: string, start: number, len: number): Promise<Buffer> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(len);
    let got = 0;
    while (got < len) {
      const { bytesRead } = await fh.read(buf, got, len - got, start + got);
      if (bytesRead === 0) throw new BuildError(`${path} shrank while it was being pushed`);
      got += bytesRead;
    }
    return buf;
  } finally {
    await fh.close();
  }
}

function withDigest(location: string, base: string, digest: string): string {
  const u = new URL(location, base);
  u.searchParams.set('digest', digest);
  return u.toString();
}

export async function uploadBlob(c: RegistryClient, blob: BlobItem, chunkSize: number, log: (l: string) => void): Promise<void> {
  const name = c.repository;
  const start = await c.request('POST', `/v2/${name}/blobs/uploads/`, { headers: { 'content-length': '0' } });
  if (start.status !== 202) await c.fail(start, `starting the upload of ${blob.digest}`);
  await start.body?.cancel();
  let location = start.headers.get('location');
  if (!location) throw new RegistryError('protocol', `registry ${c.host} started an upload without a Location header`);
  // Hash while sending: a layout blob whose bytes don't match its name is caught here,
  // with a clearer message than the registry's DIGEST_INVALID.
  const sha = createHash('sha256');
  let final: Response;
  if (blob.size <= chunkSize) {
    const body = blob.bytes ?? (await readRange(blob.path, 0, blob.size));
    sha.update(body);
    checkLocal(blob, sha);
    final = await c.request('PUT', withDigest(location, c.base, blob.digest), {
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(body.length) },
      body,
    });
  } else {
    for (let off = 0; off < blob.size; off += chunkSize) {
      const len = Math.min(chunkSize, blob.size - off);
      const body = await readRange(blob.path, off, len);
      sha.update(body);
      const res = await c.request('PATCH', location, {
        headers: { 'content-type': 'application/octet-stream', 'content-length': String(len), 'content-range': `${off}-${off + len - 1}` },
        body,
      });
      if (res.status !== 202) await c.fail(res, `uploading bytes ${off}-${off + len - 1} of ${blob.digest}`);
      await res.body?.cancel();
      const range = res.headers.get('range');
      if (range && range !== `0-${off + len - 1}`) {
        throw new RegistryError('protocol', `registry ${c.host} acknowledged range ${range} after sending bytes up to ${off + len - 1} of ${blob.digest}`);
      }
      location = res.headers.get('location') ?? location;
      log(`  ${blob.digest.slice(0, 19)} ${off + len}/${blob.size} bytes`);
    }
    checkLocal(blob, sha);
    final = await c.request('PUT', withDigest(location, c.base, blob.digest), { headers: { 'content-length': '0' } });
  }
  if (final.status !== 201) await c.fail(final, `completing the upload of ${blob.digest}`);
  await final.body?.cancel();
  checkEchoedDigest(final, blob.digest, `blob ${blob.digest}`, c.host, log);
}

function checkLocal(blob: BlobItem, sha: ReturnType<typeof createHash>): void {
  const actual = 'sha256:' + sha.digest('hex');
  if (actual !== blob.digest) {
    throw new RegistryDigestMismatchError(blob.digest, actual, `layout blob ${blob.path} hashes to ${actual}, not ${blob.digest}: the layout is corrupt`);
  }
}

/** A client for ref's repository after a successful GET /v2/ (reachability and auth settled once). */
export async function connectRegistry(ref: ImageRef, opts: PushOptions = {}): Promise<RegistryClient> {
  const insecure = opts.insecure ?? isLoopbackHost(ref.host);
  const c = new RegistryClient(`${insecure ? 'http' : 'https'}://${ref.host}`, ref.host, ref.repository, opts);
  const ping = await c.request('GET', '/v2/');
  await ping.body?.cancel();
  if (!ping.ok) throw new RegistryError('protocol', `registry ${ref.host} does not speak the distribution API: GET /v2/ answered HTTP ${ping.status}`);
  return c;
}

/** Push an OCI image layout to host[:port]/repo[:tag]. Returns the pushed manifest digest. */
export async function pushLayout(layoutDir: string, ref: string, opts: PushOptions = {}): Promise<PushResult> {
  const r = parseRef(ref);
  const log = opts.log ?? (() => {});
  const chunkSize = opts.chunkSize ?? 16 * 1024 * 1024;
  if (!Number.isInteger(chunkSize) || chunkSize < 1) throw new UsageError(`chunkSize must be a positive integer, got ${chunkSize}`);
  const plan = await planPush(layoutDir, r.tag);
  // Ping: the cheapest way to fail early on reachability, and it settles auth once.
  const c = await connectRegistry(r, opts);

  const pushed: string[] = [];
  const skipped: string[] = [];
  for (const blob of plan.blobs) {
    const head = await c.request('HEAD', `/v2/${r.repository}/blobs/${blob.digest}`);
    await head.body?.cancel();
    if (head.status === 200) {
      skipped.push(blob.digest);
      log(`blob ${blob.digest} exists, skipped`);
      continue;
    }
    if (head.status !== 404) await c.fail(head, `checking blob ${blob.digest}`);
    log(`blob ${blob.digest} uploading (${blob.size} bytes${blob.size > chunkSize ? `, chunks of ${chunkSize}` : ''})`);
    await uploadBlob(c, blob, chunkSize, log);
    pushed.push(blob.digest);
  }

  // Children by digest, then the top manifest by tag.
  const top = plan.manifests[plan.manifests.length - 1];
  for (const m of plan.manifests) {
    const reference = m === top ? plan.tag : m.digest;
    const res = await c.request('PUT', `/v2/${r.repository}/manifests/${reference}`, {
      headers: { 'content-type': m.mediaType, 'content-length': String(m.bytes.length) },
      body: m.bytes,
    });
    if (res.status !== 201) await c.fail(res, `putting manifest ${m.digest} as ${reference}`);
    await res.body?.cancel();
    checkEchoedDigest(res, m.digest, `manifest ${reference}`, r.host, log);
    log(`manifest ${m.digest} -> ${r.host}/${r.repository}:${reference}`);
  }
  return { digest: top.digest, pushed, skipped };
}
