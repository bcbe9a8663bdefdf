// Small FreeBSD packages from manifests written in the spec, packed the way
// `pkg create` lays them out (+COMPACT_MANIFEST, +MANIFEST, payload under the
// prefix). Made for configuration packages and for fixtures/pkgrepo.yaml, which
// needs .pkg files on a machine without FreeBSD. No binaries are compiled here.
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { z } from 'zod';
import { defineStage, StageError } from '../src/stage.js';
import { checkManifest, packPkg, type Manifest } from '../src/lib/pkgrepo/format.js';

const SAFE = /^[A-Za-z0-9_+.@-][A-Za-z0-9_+.@,-]*$/;
const FILE_PATH = /^[A-Za-z0-9_+.@,-]+(\/[A-Za-z0-9_+.@,-]+)*$/;

const Package = z
  .object({
    name: z.string().regex(SAFE),
    origin: z.string().regex(/^[A-Za-z0-9_+.-]+\/[A-Za-z0-9_+.,@-]+$/, 'origin is category/port'),
    version: z.string().regex(SAFE),
    comment: z.string().min(1),
    desc: z.string().default(''),
    maintainer: z.string().default('ports@FreeBSD.org'),
    www: z.string().optional(),
    licenses: z.array(z.string()).default([]),
    categories: z.array(z.string()).optional(),
    /** Dependencies by package name, as in a manifest's `deps`. */
    deps: z.record(z.string().regex(SAFE), z.object({ origin: z.string(), version: z.string() }).strict()).optional(),
    /** Installed files under the prefix (relative paths) and their text. */
    files: z.record(z.string().regex(FILE_PATH, 'file paths are relative to the prefix, no ".."'), z.string()).default({}),
  })
  .strict();

export const Params = z
  .object({
    packages: z.array(Package).min(1),
    /** pkg ABI string the packages claim, e.g. FreeBSD:14:amd64. */
    abi: z.string().regex(/^FreeBSD:\d+:[a-z0-9_]+$/).default('FreeBSD:14:amd64'),
    prefix: z.string().regex(/^\/[A-Za-z0-9_/.-]*$/).default('/usr/local'),
    compression: z.enum(['gzip', 'none']).default('gzip'),
  })
  .strict();

/** pkg's legacy `arch` for an ABI (pkg_arch_to_legacy), for the few arches we name. */
function legacyArch(abi: string): string | undefined {
  const [, major, arch] = abi.split(':');
  const m: Record<string, string> = { amd64: 'x86:64', i386: 'x86:32', aarch64: 'aarch64:64', riscv64: 'riscv:64' };
  return m[arch!] ? `freebsd:${major}:${m[arch!]}` : undefined;
}

export default defineStage({
  kind: 'pkg-create',
  version: '1',
  summary: 'small FreeBSD .pkg files from manifests in the spec (pkg create layout)',
  params: Params,
  inputs: [],
  tools: () => [],
  async run(ctx) {
    const p = ctx.params;
    const seen = new Set<string>();
    for (const pkg of p.packages) {
      if (seen.has(pkg.name)) throw new StageError(`pkg-create: package ${pkg.name} is listed twice`);
      seen.add(pkg.name);
      const { files, ...fields } = pkg;
      const manifest: Manifest = checkManifest(
        {
          ...fields,
          ...(fields.www === undefined ? {} : { www: fields.www }),
          abi: p.abi,
          ...(legacyArch(p.abi) ? { arch: legacyArch(p.abi) } : {}),
          prefix: p.prefix,
          licenselogic: 'single',
          categories: fields.categories ?? [fields.origin.split('/')[0]],
        },
        pkg.name,
      );
      const tar = packPkg(
        manifest,
        Object.entries(files).map(([path, content]) => ({ path, content })),
        ctx.sourceDateEpoch,
      );
      const file = `${pkg.name}-${pkg.version}.pkg`;
      await writeFile(join(ctx.outDir, file), p.compression === 'gzip' ? gzipSync(tar, { level: 9 }) : tar, { mode: 0o644 });
      ctx.log(`${file}: ${Object.keys(files).length} files`);
    }
    ctx.setMeta({ packages: p.packages.map((x) => `${x.name}-${x.version}`) });
  },
});
