// A real distribution v2 registry (Debian's docker-registry) on a free loopback
// port, with throwaway storage, for integration tests. Optional htpasswd basic auth.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { createPrivateKey, randomUUID, sign, X509Certificate } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer as createHttpServer, type Server } from 'node:http';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface RegistryServer {
  /** "127.0.0.1:PORT", usable as the host part of a ref. */
  host: string;
  port: number;
  url: string;
  /** The registry's storage root (filesystem driver), for tests that tamper with stored blobs. */
  storage: string;
  stop(): Promise<void>;
}

/** A loopback port nothing listens on right now. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      s.close(() => (typeof a === 'object' && a ? resolve(a.port) : reject(new Error('no port'))));
    });
  });
}

export interface RegistryOptions {
  /** basic: htpasswd; token: a bearer token service (started here) that checks these credentials. */
  auth?: { username: string; password: string; mode?: 'basic' | 'token' };
}

export async function startRegistry(opts: RegistryOptions = {}): Promise<RegistryServer> {
  const dir = await mkdtemp(join(tmpdir(), 'registry-'));
  const port = await freePort();
  let authBlock = '';
  let tokenServer: Server | undefined;
  if (opts.auth?.mode === 'token') {
    const t = await startTokenServer(dir, opts.auth);
    tokenServer = t.server;
    authBlock =
      `auth:\n  token:\n    realm: ${t.realm}\n    service: ${TOKEN_SERVICE}\n    issuer: ${TOKEN_ISSUER}\n` +
      `    rootcertbundle: ${t.certPath}\n`;
  } else if (opts.auth) {
    // bcrypt is the only hash distribution's htpasswd accepts; password via stdin (-i).
    const line = execFileSync('htpasswd', ['-B', '-i', '-n', opts.auth.username], { input: opts.auth.password, encoding: 'utf8' });
    await writeFile(join(dir, 'htpasswd'), line.trim() + '\n');
    authBlock = `auth:\n  htpasswd:\n    realm: pipeline-test\n    path: ${join(dir, 'htpasswd')}\n`;
  }
  const config =
    `version: 0.1\n` +
    `log:\n  level: warn\n  accesslog:\n    disabled: true\n` +
    `storage:\n  filesystem:\n    rootdirectory: ${join(dir, 'data')}\n  delete:\n    enabled: true\n` +
    `http:\n  addr: 127.0.0.1:${port}\n  secret: pipeline-test-secret\n` +
    authBlock;
  const configPath = join(dir, 'config.yml');
  await writeFile(configPath, config);

  const child: ChildProcess = spawn('/usr/bin/docker-registry', ['serve', configPath], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.on('data', (d) => (output = (output + d).slice(-4000)));
  child.stderr!.on('data', (d) => (output = (output + d).slice(-4000)));
  let exited = false;
  const exitP = new Promise<void>((r) => child.once('exit', () => ((exited = true), r())));

  const stop = async () => {
    if (!exited && child.pid) {
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exitP;
      clearTimeout(t);
    }
    if (tokenServer) await new Promise((r) => tokenServer!.close(r));
    await rm(dir, { recursive: true, force: true });
  };

  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 15000;
  for (;;) {
    if (exited) {
      await stop();
      throw new Error(`docker-registry exited during startup:\n${output}`);
    }
    try {
      const res = await fetch(`${url}/v2/`);
      await res.body?.cancel();
      if (res.status === 200 || res.status === 401) break;
    } catch {
      /* not listening yet */
    }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`docker-registry did not answer on ${url}/v2/ within 15 s:\n${output}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return { host: `127.0.0.1:${port}`, port, url, storage: join(dir, 'data'), stop };
}

const TOKEN_SERVICE = 'pipeline-test-registry';
const TOKEN_ISSUER = 'pipeline-test-issuer';

const b64url = (b: Buffer | string) => Buffer.from(b).toString('base64url');

/**
 * A minimal Docker token service: checks Basic credentials and returns an ES256 JWT
 * granting the requested repository scopes. The registry trusts it through a
 * self-signed certificate (openssl) named in rootcertbundle and sent as x5c.
 */
async function startTokenServer(dir: string, creds: { username: string; password: string }): Promise<{ server: Server; realm: string; certPath: string }> {
  const keyPath = join(dir, 'token.key');
  const certPath = join(dir, 'token.crt');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', keyPath, '-out', certPath, '-days', '2', '-subj', '/CN=pipeline-test-token',
  ], { stdio: 'ignore' });
  const key = createPrivateKey(await readFile(keyPath));
  const certDer = new X509Certificate(await readFile(certPath)).raw;
  const expected = 'Basic ' + Buffer.from(`${creds.username}:${creds.password}`).toString('base64');

  const server = createHttpServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    if (url.pathname !== '/token' || req.headers.authorization !== expected) {
      res.writeHead(401, { 'content-type': 'application/json' }).end('{"details":"bad credentials"}');
      return;
    }
    const access = url.searchParams.getAll('scope').flatMap((s) => {
      const m = /^repository:([^:]+):(.+)$/.exec(s);
      return m ? [{ type: 'repository', name: m[1], actions: m[2].split(',') }] : [];
    });
    const now = Math.floor(Date.now() / 1000);
    const header = b64url(JSON.stringify({ typ: 'JWT', alg: 'ES256', x5c: [certDer.toString('base64')] }));
    const claims = b64url(JSON.stringify({
      iss: TOKEN_ISSUER, sub: creds.username, aud: url.searchParams.get('service'),
      exp: now + 600, nbf: now - 60, iat: now - 60, jti: randomUUID(), access,
    }));
    // JWS ES256 wants the raw r||s signature, not DER.
    const sig = sign('sha256', Buffer.from(`${header}.${claims}`), { key, dsaEncoding: 'ieee-p1363' });
    const token = `${header}.${claims}.${b64url(sig)}`;
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token, access_token: token, expires_in: 600 }));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const a = server.address();
  if (!a || typeof a !== 'object') throw new Error('token server has no address');
  return { server, realm: `http://127.0.0.1:${a.port}/token`, certPath };
}
