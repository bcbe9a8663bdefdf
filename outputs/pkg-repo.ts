// A signed FreeBSD pkg repository (what `pkg repo` / poudriere publish) from the
// .pkg files of its input: meta.conf, packagesite.pkg, data.pkg, All/*.pkg, plus
// the public key and the fingerprint file clients trust. Static files only, so
// any web server serves the published directory as the repository URL.
import { readFile } from 'node:fs/promises';
import { isAbsolute, join } from 'node:path';
import { z } from 'zod';
import { defineStage, specPath, StageError, type RunContext, type ToolSpec } from '../src/stage.js';
import { buildRepo, zstdDecompressor } from '../src/lib/pkgrepo/repo.js';
import { commandSigner, keySigner, type Signer } from '../src/lib/pkgrepo/sign.js';

export const Params = z
  .object({
    /** RSA private key (PEM), spec-relative; `pkg repo DIR KEY`. Hashed into the cache key. */
    signing_key: specPath({ type: 'file', symlinks: 'reject' }).optional(),
    /**
     * pkg's signing_command as an argument array: it reads the hex SHA-256 on stdin
     * and prints SIGNATURE/CERT/END (pkg-repo(8)), so the key can stay in an HSM or
     * on another host. A first word with a "/" is spec-relative.
     */
    signing_command: z.array(z.string().min(1)).min(1).optional(),
    /** Catalogue compression: gzip (`tgz` in meta.conf) or none (`tar`). zstd is left out: Node 20 has no codec. */
    compression: z.enum(['gzip', 'none']).default('gzip'),
  })
  .strict()
  .refine((p) => (p.signing_key === undefined) !== (p.signing_command === undefined), { message: 'give exactly one of signing_key or signing_command' });
type P = z.infer<typeof Params>;

function signerFor(ctx: RunContext<P>): Promise<Signer> | Signer {
  const p = ctx.params;
  if (p.signing_key) {
    return readFile(join(ctx.specDir, p.signing_key)).then((pem) => {
      try {
        return keySigner(pem);
      } catch (e) {
        throw new StageError(`pkg-repo: ${p.signing_key}: ${(e as Error).message}`);
      }
    });
  }
  const [cmd0, ...args] = p.signing_command!;
  const cmd = cmd0!.includes('/') && !isAbsolute(cmd0!) ? join(ctx.specDir, cmd0!) : cmd0!;
  let n = 0;
  return commandSigner(async (stdin) => {
    // The protocol's stdout is binary and ctx.exec captures text, so a constant
    // sh wrapper sends it to a file; the command and its arguments stay argv.
    const out = join(ctx.workDir, `signing-${++n}.out`);
    await ctx.exec('sh', ['-c', 'out=$1; shift; exec "$@" > "$out"', 'sh', out, cmd, ...args], { input: stdin });
    return readFile(out);
  });
}

export default defineStage({
  kind: 'pkg-repo',
  version: '1',
  summary: 'signed FreeBSD pkg repository (meta.conf, packagesite.pkg, data.pkg, All/*.pkg, key + fingerprint)',
  params: Params,
  inputs: ['packages'],
  tools: (p) => {
    const t: ToolSpec[] = [{ name: 'zstd', apt: 'zstd' }];
    // dash prints no version; the engine keys it on the binary's hash instead.
    if (p.signing_command) t.push({ name: 'sh', apt: 'dash', versionArgs: ['-c', ':'] });
    return t;
  },
  assets: (p) => (p.signing_key ? [p.signing_key] : []),
  async run(ctx) {
    const input = ctx.inputs.packages!;
    const pkgs = input.files.filter((f) => f.endsWith('.pkg')).map((f) => join(input.dir, f));
    if (pkgs.length === 0) throw new StageError(`pkg-repo: input "packages" (${input.kind}) has no .pkg files; it has: ${input.files.slice(0, 10).join(', ') || '(nothing)'}`);
    const signer = await signerFor(ctx);
    let built;
    try {
      built = await buildRepo({
        packages: pkgs,
        outDir: ctx.outDir,
        mtime: ctx.sourceDateEpoch,
        packing: ctx.params.compression === 'gzip' ? 'tgz' : 'tar',
        signer,
        decompress: zstdDecompressor((cmd, args) => ctx.exec(cmd, args), ctx.workDir),
        log: (l) => ctx.log(l),
      });
    } catch (e) {
      if (e instanceof StageError) throw e;
      throw new StageError(`pkg-repo: ${(e as Error).message}`);
    }
    ctx.log(`signed with ${signer.describe}; fingerprint ${built.fingerprint}`);
    ctx.setMeta({ packages: built.packages, fingerprint: built.fingerprint, packing_format: ctx.params.compression === 'gzip' ? 'tgz' : 'tar' });
  },
});
