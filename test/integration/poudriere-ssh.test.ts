// The poudriere kind's ssh transport against a real OpenSSH sshd that this test
// starts on 127.0.0.1 inside a network namespace it creates (Debian
// openssh-server; temp host key, temp authorized_keys). The far side runs a
// STAND-IN `poudriere` shell script (no FreeBSD here): it keeps jail/ports lists,
// makes the ports tree a real git repository, and on `bulk` copies .pkg files
// crafted by this test into its package directory, writes a log and, for ports
// listed as failing, poudriere's .poudriere.ports.failed and an error log.
// The CLI runs inside the same namespace, through the real engine and cache.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import { checkManifest, packPkg } from '../../src/lib/pkgrepo/format.js';
import { BIN } from '../helpers/cli.js';

const run = promisify(execFile);
const PORT = 22022;
const ns = `pipeline-poudriere-${process.pid}`;
let D = '';
let sshd: ChildProcess | undefined;
let skip = '';

function canRun(): string {
  if (process.getuid?.() !== 0) return 'needs root (ip netns, sshd)';
  for (const t of ['/usr/sbin/sshd', '/usr/sbin/ip', '/usr/bin/ssh-keygen', '/usr/lib/openssh/sftp-server']) if (!existsSync(t)) return `${t} missing (apt-get install openssh-server iproute2)`;
  return '';
}

// The stand-in for poudriere on the builder. $0's directory holds its state.
const STANDIN = `#!/bin/sh
# STAND-IN for poudriere(8), for tests only: it builds nothing.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
state="$here/state"; data="$here/data"
mkdir -p "$state"
echo "$*" >> "$state/calls"
cmd=$1; shift
case "$cmd" in
jail)
  case "$1" in
  -l) cat "$state/jails" 2>/dev/null || true ;;
  -c) shift; while getopts j:v:a: o; do case $o in j) j=$OPTARG;; v) v=$OPTARG;; a) a=$OPTARG;; esac; done
      echo "$j $v $a http 2026-01-01 00:00:00 /usr/local/poudriere/jails/$j" >> "$state/jails" ;;
  -u) shift; while getopts j:t: o; do case $o in j) j=$OPTARG;; t) t=$OPTARG;; esac; done
      sed -i "s|^$j [^ ]* |$j $t |" "$state/jails" ;;
  esac ;;
ports)
  case "$1" in
  -l) cat "$state/ports" 2>/dev/null || true ;;
  -c) shift; while getopts p:m:U:B: o; do case $o in p) p=$OPTARG;; m) m=$OPTARG;; U) u=$OPTARG;; B) b=$OPTARG;; esac; done
      dir="$here/ports/$p"; mkdir -p "$dir"; git -C "$dir" init -q
      echo "$u $b" > "$dir/README"; git -C "$dir" add README
      GIT_AUTHOR_DATE=2026-01-01T00:00:00Z GIT_COMMITTER_DATE=2026-01-01T00:00:00Z git -C "$dir" -c user.name=t -c user.email=t@t commit -q -m "ports $b"
      echo "$p $m 2026-01-01 00:00:00 $dir" >> "$state/ports" ;;
  -u) : ;;
  esac ;;
bulk)
  while getopts j:p:z:c o; do case $o in j) j=$OPTARG;; p) p=$OPTARG;; *) : ;; esac; done
  shift $((OPTIND - 1))
  master="$j-$p"; logs="$data/logs/bulk/$master/latest"; pkgs="$data/packages/$master/All"
  rm -rf "$logs"; mkdir -p "$logs/logs/errors" "$pkgs"
  echo "[00:00:00] Building $# packages using 1 builders"
  if [ -e "$here/slow" ]; then echo "[00:00:01] (slow build)"; sleep 60; fi
  rc=0
  for origin in "$@"; do
    name=\${origin#*/}
    if grep -qx "$origin" "$here/failing" 2>/dev/null; then
      echo "$origin $name-1.0 build build 00:00:01" >> "$logs/.poudriere.ports.failed"
      printf 'building %s\\nerror: %s does not compile\\n' "$origin" "$origin" > "$logs/logs/errors/$name-1.0.log"
      echo "[00:00:02] [01] Finished $origin | $name-1.0: Failed: build"; rc=1
    else
      cp "$here/fixtures/$(echo "$origin" | tr / _).pkg" "$pkgs/"
      echo "[00:00:02] [01] Finished $origin | $name-1.0: Success"
    fi
  done
  exit $rc ;;
esac
`;

async function sh(cmd: string, args: string[]) {
  return run(cmd, args);
}

function startSshd(): Promise<ChildProcess> {
  return new Promise((resolve, reject) => {
    const p = spawn('ip', ['netns', 'exec', ns, '/usr/sbin/sshd', '-D', '-e', '-f', path.join(D, 'sshd_config')], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    const t = setTimeout(() => reject(new Error(`sshd did not start: ${err}`)), 10_000);
    p.stderr!.on('data', (d) => {
      err += d;
      if (/Server listening on 127\.0\.0\.1/.test(err)) {
        clearTimeout(t);
        resolve(p);
      }
    });
    p.on('exit', (c) => reject(new Error(`sshd exited ${c}: ${err}`)));
  });
}

/** sshd and every process it forked (one per connection), by pid: only what this test started. */
function killSshdTree(pid: number): void {
  const kids = (p: number): number[] => {
    let out: number[] = [];
    try {
      for (const t of readFileSync(`/proc/${p}/task/${p}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number)) out = [...out, t, ...kids(t)];
    } catch {
      /* gone */
    }
    return out;
  };
  for (const p of [...kids(pid), pid]) {
    try {
      process.kill(p, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }
}

function spec(o: { packages: string[]; knownHosts?: string }): string {
  return `name: poudriere-ssh
arches: [amd64]
source_date_epoch: 1704067200
stages:
  ports:
    kind: poudriere
    with:
      builder: { host: 127.0.0.1, port: ${PORT}, user: root, key: secrets/builder_ed25519, known_hosts: ${o.knownHosts ?? 'secrets/known_hosts'} }
      jail: { name: 14_2-amd64, version: 14.2-RELEASE, arch: amd64 }
      ports: { tree: default, git: "https://git.example.invalid/ports.git", ref: 2026Q4 }
      packages: [${o.packages.join(', ')}]
      options: files/make.conf
      poudriere: [${D}/remote/poudriere]
      data_dir: ${D}/remote/data
      config_dir: ${D}/remote/poudriere.d
  repo:
    kind: pkg-repo
    inputs: { packages: ports }
    with: { signing_key: keys/repo.key }
variants:
  repo: [repo]
`;
}

/** The real CLI, inside the test's network namespace (where sshd listens). */
function pipeline(args: string[], opts: { onStart?: (p: ChildProcess) => void } = {}): Promise<{ code: number; out: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn('ip', ['netns', 'exec', ns, process.execPath, BIN, ...args], { cwd: path.join(D, 'spec'), env: { ...process.env, PIPELINE_CACHE_DIR: path.join(D, 'cache') }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout!.on('data', (d) => (out += d));
    p.stderr!.on('data', (d) => (out += d));
    p.on('error', reject);
    p.on('close', (code) => resolve({ code: code ?? -1, out }));
    opts.onStart?.(p);
  });
}

async function build(packages: string[], knownHosts?: string, onStart?: (p: ChildProcess) => void) {
  await writeFile(path.join(D, 'spec', 'spec.yaml'), spec({ packages, knownHosts }));
  return pipeline(['build', '-f', 'spec.yaml', 'amd64', 'repo', '--verbose'], { onStart });
}

const calls = () => readFile(path.join(D, 'remote/state/calls'), 'utf8').catch(() => '');

before(async () => {
  skip = canRun();
  if (skip) return;
  D = await mkdtemp(path.join(tmpdir(), 'poudriere-ssh-'));
  for (const d of ['spec/secrets', 'spec/files', 'spec/keys', 'remote/fixtures', 'remote/poudriere.d']) await mkdir(path.join(D, d), { recursive: true });
  await sh('ip', ['netns', 'add', ns]);
  await sh('ip', ['netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'up']);
  // sshd's privilege-separation directory (the package creates it at boot only).
  await mkdir('/run/sshd', { recursive: true, mode: 0o755 });
  await sh('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'host', '-f', path.join(D, 'hostkey')]);
  await sh('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'impostor', '-f', path.join(D, 'otherhostkey')]);
  await sh('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-C', 'builder', '-f', path.join(D, 'spec/secrets/builder_ed25519')]);
  // As a checkout leaves it: world-readable. The kind must cope (ssh refuses such keys).
  await chmod(path.join(D, 'spec/secrets/builder_ed25519'), 0o644);
  await writeFile(path.join(D, 'authorized_keys'), await readFile(path.join(D, 'spec/secrets/builder_ed25519.pub')), { mode: 0o600 });
  const hostPub = (await readFile(path.join(D, 'hostkey.pub'), 'utf8')).split(' ').slice(0, 2).join(' ');
  const otherPub = (await readFile(path.join(D, 'otherhostkey.pub'), 'utf8')).split(' ').slice(0, 2).join(' ');
  await writeFile(path.join(D, 'spec/secrets/known_hosts'), `[127.0.0.1]:${PORT} ${hostPub}\n`);
  await writeFile(path.join(D, 'spec/secrets/wrong_known_hosts'), `[127.0.0.1]:${PORT} ${otherPub}\n`);
  await writeFile(
    path.join(D, 'sshd_config'),
    [`Port ${PORT}`, 'ListenAddress 127.0.0.1', `HostKey ${D}/hostkey`, `AuthorizedKeysFile ${D}/authorized_keys`, 'PidFile none', 'StrictModes no', 'UsePAM no', 'PasswordAuthentication no', 'KbdInteractiveAuthentication no', 'PermitRootLogin prohibit-password', 'Subsystem sftp /usr/lib/openssh/sftp-server', ''].join('\n'),
  );
  await writeFile(path.join(D, 'spec/files/make.conf'), 'DEFAULT_VERSIONS+=ssl=openssl\n');
  await sh('openssl', ['genrsa', '-out', path.join(D, 'spec/keys/repo.key'), '2048']);
  await writeFile(path.join(D, 'remote/poudriere'), STANDIN, { mode: 0o755 });
  for (const [origin, version] of [['www/nginx', '1.26.2'], ['devel/pcre2', '10.44'], ['www/broken', '1.0']] as const) {
    const name = origin.split('/')[1]!;
    const m = checkManifest({ name, origin, version, comment: `${name} (fixture)`, prefix: '/usr/local', abi: 'FreeBSD:14:amd64' }, name);
    await writeFile(path.join(D, 'remote/fixtures', `${origin.replace('/', '_')}.pkg`), gzipSync(packPkg(m, [{ path: `share/${name}/README`, content: `${name}\n` }], 1704067200)));
  }
  sshd = await startSshd();
});

after(async () => {
  if (sshd?.pid) killSshdTree(sshd.pid);
  if (!skip) {
    try {
      execFileSync('ip', ['netns', 'delete', ns]);
    } catch {
      /* already gone */
    }
  }
  if (D) await rm(D, { recursive: true, force: true });
});

test('builds over ssh: jail and ports created, bulk run, packages fetched into a signed repo; rerun is idempotent', async (t) => {
  if (skip) return t.skip(skip);
  const r = await build(['www/nginx', 'devel/pcre2']);
  assert.equal(r.code, 0, r.out);
  const c = await calls();
  assert.match(c, /^jail -l -q\njail -c -j 14_2-amd64 -v 14.2-RELEASE -a amd64\nports -l -q\nports -c -p default -m git\+https -U https:\/\/git.example.invalid\/ports.git -B 2026Q4\nports -l -q\nbulk -j 14_2-amd64 -p default www\/nginx devel\/pcre2\n$/);
  assert.match(r.out, /Finished www\/nginx \| nginx-1\.0: Success/, 'the bulk log streams into the stage log');
  // make.conf uploaded under poudriere's per-build name.
  assert.equal(await readFile(path.join(D, 'remote/poudriere.d/14_2-amd64-default-make.conf'), 'utf8'), 'DEFAULT_VERSIONS+=ssl=openssl\n');
  const out = path.join(D, 'spec/images/repo/amd64');
  const v = await pipeline(['pkg-repo', 'verify', out, '--fingerprint', path.join(out, 'repo.fingerprint')]);
  assert.equal(v.code, 0, v.out);
  assert.match(v.out, /2 packages/);
  const manifest = JSON.parse(await readFile(path.join(out, 'build-manifest.json'), 'utf8'));
  const commit = (await run('git', ['-C', path.join(D, 'remote/ports/default'), 'rev-parse', 'HEAD'])).stdout.trim();
  assert.ok(JSON.stringify(manifest).includes(commit), 'the ports commit is recorded in the build manifest');
  // The private key's body never shows up in the output, even with --verbose.
  const keyBody = (await readFile(path.join(D, 'spec/secrets/builder_ed25519'), 'utf8')).split('\n')[2]!;
  assert.ok(keyBody.length > 20 && !r.out.includes(keyBody));

  // Another package list: the jail and tree exist now, so they are left alone / updated.
  const r2 = await build(['www/nginx']);
  assert.equal(r2.code, 0, r2.out);
  const c2 = (await calls()).slice(c.length);
  assert.equal(c2, 'jail -l -q\nports -l -q\nports -u -p default -B 2026Q4\nports -l -q\nbulk -j 14_2-amd64 -p default www/nginx\n');
});

test('a host key that does not match known_hosts is refused before anything runs', async (t) => {
  if (skip) return t.skip(skip);
  const before = await calls();
  const r = await build(['devel/pcre2', 'www/nginx'], 'secrets/wrong_known_hosts');
  assert.equal(r.code, 1, r.out);
  assert.match(r.out, /host key of 127\.0\.0\.1:22022 does not match secrets\/wrong_known_hosts; refusing to connect/);
  assert.equal(await calls(), before, 'nothing ran on the builder');
});

test('a failing port fails the stage and names the port and its log', async (t) => {
  if (skip) return t.skip(skip);
  await writeFile(path.join(D, 'remote/failing'), 'www/broken\n');
  const r = await build(['www/nginx', 'www/broken']);
  await rm(path.join(D, 'remote/failing'));
  assert.equal(r.code, 1, r.out);
  assert.match(r.out, /port www\/broken \(broken-1\.0\) failed in build; log: 127\.0\.0\.1:\S+\/logs\/bulk\/14_2-amd64-default\/latest\/logs\/errors\/broken-1\.0\.log/);
  assert.match(r.out, /error: www\/broken does not compile/, "the port log's tail is shown");
});

test('a dropped connection mid-build fails the stage cleanly and caches nothing', async (t) => {
  if (skip) return t.skip(skip);
  await writeFile(path.join(D, 'remote/slow'), '');
  const before = (await calls()).length;
  const r = await build(['devel/pcre2'], undefined, () => {
    const poll = setInterval(async () => {
      if ((await calls()).slice(before).includes('bulk ')) {
        clearInterval(poll);
        killSshdTree(sshd!.pid!);
      }
    }, 200);
  });
  await rm(path.join(D, 'remote/slow'));
  assert.equal(r.code, 1, r.out);
  assert.match(r.out, /lost the ssh connection to root@127\.0\.0\.1:22022 while running poudriere bulk/);
  const ls = await pipeline(['cache', 'ls', '--json']);
  const entries = JSON.parse(ls.out) as { stage: string; key: string }[];
  const planned = await pipeline(['plan', '-f', 'spec.yaml', 'amd64', 'repo', '--json']);
  assert.equal(planned.code, 0, planned.out);
  const key = (JSON.parse(planned.out).stages as { name: string; key: string }[]).find((s) => s.name === 'ports')!.key;
  assert.ok(!entries.some((e) => e.key === key), 'the failed poudriere run left no cache entry');
  assert.ok(entries.some((e) => e.stage === 'ports'), 'earlier successful runs are cached (the check can see entries)');
});
