// The `root: composefs` mode of the raw disk emitter: the root partition holds a
// composefs stage's output (image.cfs, layers/<digest>.cfs, objects/xx/…) instead
// of a rootfs tree, on ext4 made with the `verity` feature, and the kernel command
// line carries the trust anchor: composefs=<fs-verity digest of image.cfs> and
// powernode.layers=<digests, highest priority first>. 90powernode's pre-pivot hook
// (dracut/modules.d/90powernode/powernode-composefs.sh) measures the images against
// those digests, checks that every object they point to is in the store (enabling
// fs-verity on them on first boot) and mounts the overlay root.
//
// Why fs-verity is enabled in the initramfs and not here: the build hosts' kernel
// has no CONFIG_FS_VERITY (FS_IOC_ENABLE_VERITY fails with EOPNOTSUPP), so only a
// guest kernel can enable it; doing it at build time would need a helper VM. The
// trust does not depend on when it is enabled: the images are measured against the
// command line, and overlayfs verity=require checks every object's fs-verity digest
// against the one its image records, so bytes changed before enabling are caught.
// Not a kind (leading `_`).
import { linkSync, mkdirSync, realpathSync } from 'node:fs';
import { mkdir, copyFile, chmod } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { z } from 'zod';
import { StageError, type RunContext } from '../src/stage.js';

/** raw's `root` param: what the root partition holds. */
export const RootMode = z.enum(['ext4', 'composefs']);
export type RootMode = z.infer<typeof RootMode>;

/** mke2fs feature list for a composefs store: fs-verity files need the `verity` feature. */
export const COMPOSEFS_MKE2FS_FEATURES = ['-O', 'verity'];

const DIGEST_RE = /^[0-9a-f]{64}$/;

export interface ComposefsMeta {
  imageDigest: string;
  /** Layer digests, highest priority first (the composefs stage's order). */
  layers: string[];
}

/** The digests a composefs stage recorded; a StageError if the input is not one. */
export function composefsMeta(kind: string, meta: Record<string, unknown>): ComposefsMeta {
  const d = meta.imageDigest;
  if (kind !== 'composefs' || typeof d !== 'string' || !DIGEST_RE.test(d)) {
    throw new StageError(`root: composefs needs a composefs stage as the rootfs input (got a ${kind} stage)`);
  }
  const layers = Array.isArray(meta.layers) ? (meta.layers as { digest?: unknown }[]).map((l) => l.digest) : [];
  for (const l of layers) if (typeof l !== 'string' || !DIGEST_RE.test(l)) throw new StageError(`composefs input has a malformed layer digest ${String(l)}`);
  return { imageDigest: d, layers: layers as string[] };
}

/** The command-line words naming the verified root (before the spec's own cmdline). */
export function composefsCmdline(m: ComposefsMeta): string {
  return [`composefs=${m.imageDigest}`, ...(m.layers.length ? [`powernode.layers=${m.layers.join(',')}`] : [])].join(' ');
}

export interface ComposefsRoot extends ComposefsMeta {
  /** Staging directory for mke2fs -d: the composefs output, hard-linked. */
  tree: string;
  /** Files whose content seeds the disk's UUIDs (the images; objects are named by content). */
  seedFiles: string[];
}

/**
 * Stage the composefs input for mke2fs -d. Hard links (a copy across devices) to
 * the input's read-only files; directories 0755. Times are pinned afterwards by
 * raw's debugfs pass, as for a rootfs tree.
 */
export async function stageComposefsRoot(ctx: RunContext<unknown>): Promise<ComposefsRoot> {
  const input = ctx.inputs.rootfs;
  if (!input) throw new StageError('no rootfs input');
  const meta = composefsMeta(input.kind, input.meta);
  const tree = join(ctx.workDir, 'composefs-root');
  await mkdir(tree);
  await chmod(tree, 0o755);
  const made = new Set<string>([tree]);
  // Synchronous calls: ~10k objects, and a thread-pool round trip per call cost more
  // than the link itself.
  for (const rel of input.files) {
    if (!(rel === 'image.cfs' || rel.startsWith('objects/') || rel.startsWith('layers/'))) continue;
    const dest = join(tree, rel);
    for (let d = dirname(dest); !made.has(d); d = dirname(d)) {
      mkdirSync(d, { recursive: true });
      made.add(d);
    }
    const src = realpathSync(join(input.dir, rel));
    try {
      linkSync(src, dest);
    } catch {
      await copyFile(src, dest);
    }
  }
  for (const d of made) await chmod(d, 0o755);
  const seedFiles = [join(tree, 'image.cfs'), ...meta.layers.map((l) => join(tree, 'layers', `${l}.cfs`))];
  return { ...meta, tree, seedFiles };
}
