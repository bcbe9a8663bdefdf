// FreeBSD ports built by poudriere on a remote FreeBSD builder, driven over ssh
// (OpenSSH through ctx.exec). The builder's host key must already be in the
// spec's known_hosts: no trust on first use. The stage creates or updates the
// jail and the ports tree, runs `poudriere bulk`, and fetches the built packages
// (All/*.pkg) as its output; a `pkg-repo` stage signs them into a repository.
//
// Cache key: the params (jail version, ports ref text, package list, …) and the
// options file's contents. The ref is resolved to a commit on the builder while
// the stage runs, after the key is fixed, so the commit goes into meta; pin
// `ports.commit` to make the key exact (the stage then fails on any other commit).
import { chmod, copyFile, mkdir, readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { sha256File } from '../src/lib/digest.js';
import { defineStage, specPath, StageError, type ExecOptions, type ExecResult, type RunContext } from '../src/stage.js';
import {
  ABS_PATH_RE,
  errorLogFile,
  failedListFile,
  HOST_RE,
  masterName,
  NAME_RE,
  ORIGIN_RE,
  packagesDir,
  parseFailedPorts,
  parseJailList,
  parsePortsList,
  portsMethod,
  REF_RE,
  remoteCommand,
  USER_RE,
} from '../src/lib/pkgrepo/poudriere.js';

const secretFile = () => specPath({ type: 'file', symlinks: 'reject' });

export const Params = z
  .object({
    builder: z
      .object({
        host: z.string().regex(HOST_RE, 'a host name or IP address'),
        user: z.string().regex(USER_RE),
        port: z.number().int().min(1).max(65535).default(22),
        /** ssh private key, spec-relative. Read by ssh only; never hashed, never logged. */
        key: secretFile(),
        /** known_hosts with the builder's host key, spec-relative. Required: no trust on first use. */
        known_hosts: secretFile(),
      })
      .strict(),
    jail: z
      .object({
        name: z.string().regex(NAME_RE),
        version: z.string().regex(/^\d+\.\d+-[A-Z0-9-]+$/, 'a FreeBSD version such as 14.2-RELEASE'),
        arch: z.string().regex(/^[a-z0-9_.]+$/),
      })
      .strict(),
    ports: z
      .object({
        tree: z.string().regex(NAME_RE).default('default'),
        /** Where to clone the tree from when the builder does not have it yet. */
        git: z.string().regex(/^(https?:\/\/|ssh:\/\/|[A-Za-z0-9_.-]+@)[^\s'"\\]+$/).optional(),
        ref: z.string().regex(REF_RE),
        /** Pin: the tree must be at exactly this commit after the update (puts the commit in the key). */
        commit: z.string().regex(/^[0-9a-f]{40}$/).optional(),
      })
      .strict(),
    packages: z.array(z.string().regex(ORIGIN_RE, 'a port origin such as www/nginx')).min(1),
    /** make.conf for this build, spec-relative; uploaded as <jail>-<tree>[-<set>]-make.conf and hashed into the key. */
    options: specPath({ type: 'file', symlinks: 'reject' }).optional(),
    set: z.string().regex(NAME_RE).optional(),
    /** `poudriere bulk -c`: drop previously built packages first. */
    clean: z.boolean().default(false),
    /** The poudriere command on the builder, e.g. [sudo, poudriere]. */
    poudriere: z.array(z.string().regex(/^[A-Za-z0-9_./-]+$/)).min(1).default(['poudriere']),
    /** POUDRIERE_DATA and the poudriere.d directory on the builder. */
    data_dir: z.string().regex(ABS_PATH_RE).default('/usr/local/poudriere/data'),
    config_dir: z.string().regex(ABS_PATH_RE).default('/usr/local/etc/poudriere.d'),
    timeout_minutes: z.number().int().min(1).default(720),
  })
  .strict();
type P = z.infer<typeof Params>;

/** Options every ssh and scp run gets: no user config, host key checked, no prompts. */
function sshOptions(p: P, keyCopy: string, knownHosts: string): string[] {
  const o = (kv: string) => ['-o', kv];
  return [
    '-F', 'none',
    ...o('BatchMode=yes'),
    ...o('StrictHostKeyChecking=yes'),
    ...o(`UserKnownHostsFile=${knownHosts}`),
    ...o('GlobalKnownHostsFile=/dev/null'),
    ...o('IdentitiesOnly=yes'),
    ...o('IdentityAgent=none'),
    ...o('ConnectTimeout=30'),
    // A dead builder or network is noticed within a minute, even mid-build.
    ...o('ServerAliveInterval=15'),
    ...o('ServerAliveCountMax=4'),
    ...o('LogLevel=ERROR'),
    '-i', keyCopy,
  ];
}

const HOST_KEY_RE = /Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED|No .* host key is known/;

class Builder {
  private opts: string[];
  constructor(
    private readonly ctx: RunContext<P>,
    keyCopy: string,
    knownHosts: string,
  ) {
    this.opts = sshOptions(ctx.params, keyCopy, knownHosts);
  }

  /** Run one command on the builder; ssh failures become messages that say what broke. */
  async run(words: string[], what: string, o: ExecOptions = {}): Promise<ExecResult> {
    const b = this.ctx.params.builder;
    try {
      return await this.ctx.exec('ssh', [...this.opts, '-p', String(b.port), '-l', b.user, '--', b.host, remoteCommand(words)], o);
    } catch (e) {
      throw this.explain(e, what);
    }
  }

  /** Copy remote files matching a glob into dir (scp over SFTP: no remote shell). */
  async fetch(remoteGlob: string, dir: string): Promise<void> {
    const b = this.ctx.params.builder;
    const host = b.host.includes(':') && !b.host.startsWith('[') ? `[${b.host}]` : b.host;
    try {
      await this.ctx.exec('scp', [...this.opts, '-P', String(b.port), '-q', '--', `${b.user}@${host}:${remoteGlob}`, dir + '/']);
    } catch (e) {
      throw this.explain(e, `fetching ${remoteGlob}`);
    }
  }

  explain(e: unknown, what: string): unknown {
    if (!(e instanceof StageError)) return e;
    const text = `${e.message}\n${e.logTail}`;
    const b = this.ctx.params.builder;
    if (HOST_KEY_RE.test(text)) return new StageError(`poudriere: the host key of ${b.host}:${b.port} does not match ${b.known_hosts}; refusing to connect (no trust on first use)`, e.logTail);
    if (/exited with code 255\b|was killed/.test(e.message)) return new StageError(`poudriere: lost the ssh connection to ${b.user}@${b.host}:${b.port} while ${what}: ${e.message}`, e.logTail);
    return new StageError(`poudriere: ${what} failed on ${b.host}: ${e.message}`, e.logTail);
  }
}

export default defineStage({
  kind: 'poudriere',
  version: '1',
  summary: 'FreeBSD packages built by poudriere on a remote builder over ssh (known_hosts required)',
  params: Params,
  inputs: [],
  tools: () => [
    { name: 'ssh', apt: 'openssh-client', versionArgs: ['-V'] },
    { name: 'scp', apt: 'openssh-client', versionArgs: ['-V'] },
  ],
  assets: (p) => (p.options ? [p.options] : []),
  async run(ctx) {
    const p = ctx.params;
    // ssh refuses a private key others can read, and a checkout rarely keeps 0600:
    // use a private copy in scratch (removed after the stage, whatever happens).
    const keyCopy = join(ctx.workDir, 'builder-key');
    await copyFile(join(ctx.specDir, p.builder.key), keyCopy);
    await chmod(keyCopy, 0o600);
    const b = new Builder(ctx, keyCopy, join(ctx.specDir, p.builder.known_hosts));
    const pd = p.poudriere;
    const master = masterName(p.jail.name, p.ports.tree, p.set);
    const capture = { capture: true };

    // Jail: create, or move it to the wanted version; left alone when it matches.
    const jails = parseJailList((await b.run([...pd, 'jail', '-l', '-q'], 'listing jails', capture)).stdout);
    const jail = jails.find((j) => j.name === p.jail.name);
    if (!jail) {
      ctx.log(`jail ${p.jail.name}: creating ${p.jail.version} ${p.jail.arch}`);
      await b.run([...pd, 'jail', '-c', '-j', p.jail.name, '-v', p.jail.version, '-a', p.jail.arch], 'creating the jail');
    } else if (jail.version !== p.jail.version) {
      ctx.log(`jail ${p.jail.name}: updating ${jail.version} -> ${p.jail.version}`);
      await b.run([...pd, 'jail', '-u', '-j', p.jail.name, '-t', p.jail.version], 'updating the jail');
    } else ctx.log(`jail ${p.jail.name}: ${jail.version} ${jail.arch}, up to date`);

    // Ports tree: create from git or update to the ref, then read the commit it is at.
    const trees = parsePortsList((await b.run([...pd, 'ports', '-l', '-q'], 'listing ports trees', capture)).stdout);
    if (!trees.some((t) => t.name === p.ports.tree)) {
      if (!p.ports.git) throw new StageError(`poudriere: ports tree "${p.ports.tree}" does not exist on ${p.builder.host} and ports.git is not set to create it`);
      ctx.log(`ports ${p.ports.tree}: cloning ${p.ports.git} at ${p.ports.ref}`);
      await b.run([...pd, 'ports', '-c', '-p', p.ports.tree, '-m', portsMethod(p.ports.git), '-U', p.ports.git, '-B', p.ports.ref], 'creating the ports tree');
    } else {
      ctx.log(`ports ${p.ports.tree}: updating to ${p.ports.ref}`);
      await b.run([...pd, 'ports', '-u', '-p', p.ports.tree, '-B', p.ports.ref], 'updating the ports tree');
    }
    const tree = parsePortsList((await b.run([...pd, 'ports', '-l', '-q'], 'listing ports trees', capture)).stdout).find((t) => t.name === p.ports.tree);
    if (!tree) throw new StageError(`poudriere: ports tree "${p.ports.tree}" is still missing after creating it`);
    const commit = (await b.run(['git', '-C', tree.path, 'rev-parse', 'HEAD'], 'reading the ports commit', capture)).stdout.trim();
    if (!/^[0-9a-f]{40}$/.test(commit)) throw new StageError(`poudriere: ports tree ${tree.path} gave no commit (got ${JSON.stringify(commit.slice(0, 80))})`);
    if (p.ports.commit && p.ports.commit !== commit) throw new StageError(`poudriere: ports tree is at ${commit} after updating to ${p.ports.ref}, but the spec pins ports.commit ${p.ports.commit}`);
    ctx.log(`ports ${p.ports.tree}: ${p.ports.ref} = ${commit}`);

    if (p.options) {
      const conf = `${p.config_dir}/${master}-make.conf`;
      await b.run(['tee', '--', conf], `uploading ${p.options}`, { input: await readFile(join(ctx.specDir, p.options)), capture: true });
      ctx.log(`options: ${p.options} -> ${conf}`);
    }

    // The build; poudriere's progress lines stream into the stage log.
    ctx.log(`bulk ${master}: ${p.packages.join(' ')}`);
    let bulkError: unknown;
    try {
      await b.run([...pd, 'bulk', '-j', p.jail.name, '-p', p.ports.tree, ...(p.set ? ['-z', p.set] : []), ...(p.clean ? ['-c'] : []), ...p.packages], 'running poudriere bulk', {
        timeoutMs: p.timeout_minutes * 60_000,
      });
    } catch (e) {
      if (e instanceof StageError && /lost the ssh connection|host key/.test(e.message)) throw e;
      bulkError = e;
    }
    // Failed ports are named whatever bulk's exit status says.
    const failedFile = failedListFile(p.data_dir, master);
    const failedText = (await b.run(['sh', '-c', 'cat -- "$1" 2>/dev/null || true', 'sh', failedFile], 'reading the failed-ports list', capture)).stdout;
    const failed = parseFailedPorts(failedText);
    if (failed.length > 0) {
      const f = failed[0]!;
      const log = errorLogFile(p.data_dir, master, f.pkgname);
      const tail = (await b.run(['sh', '-c', 'tail -n 40 -- "$1" 2>/dev/null || true', 'sh', log], 'reading the port log', capture)).stdout;
      const others = failed.length > 1 ? ` (and ${failed.length - 1} more: ${failed.slice(1).map((x) => x.origin).join(', ')})` : '';
      throw new StageError(`poudriere: port ${f.origin} (${f.pkgname}) failed in ${f.phase}${others}; log: ${p.builder.host}:${log}`, tail);
    }
    if (bulkError) throw bulkError;

    const fetched = join(ctx.workDir, 'fetched');
    await mkdir(fetched);
    await b.fetch(`${packagesDir(p.data_dir, master)}/*.pkg`, fetched);
    const names = (await readdir(fetched)).filter((f) => f.endsWith('.pkg')).sort();
    if (names.length === 0) throw new StageError(`poudriere: bulk succeeded but ${packagesDir(p.data_dir, master)} holds no .pkg files`);
    const built: { file: string; sha256: string }[] = [];
    for (const n of names) {
      if (!/^[A-Za-z0-9_+.@,-]+\.pkg$/.test(n)) throw new StageError(`poudriere: refusing package file name ${JSON.stringify(n)}`);
      await copyFile(join(fetched, n), join(ctx.outDir, n));
      await chmod(join(ctx.outDir, n), 0o644);
      built.push({ file: n, sha256: await sha256File(join(ctx.outDir, n)) });
    }
    ctx.log(`fetched ${built.length} packages`);
    ctx.setMeta({
      builder: `${p.builder.user}@${p.builder.host}:${p.builder.port}`,
      jail: p.jail,
      ports: { tree: p.ports.tree, ref: p.ports.ref, commit },
      requested: p.packages,
      packages: built,
    });
  },
});
