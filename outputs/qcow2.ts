// qcow2 disk (disk.qcow2) for libvirt and cloud import, converted from the raw
// emitter's disk.raw. qemu-img writes no timestamps into qcow2; every format option
// is pinned (so a newer qemu's defaults cannot change the bytes) and out-of-order
// writes (-W) stay off, so the cluster order, compressed or not, follows the input.
import { join } from 'node:path';
import { z } from 'zod';
import { defineStage } from '../src/stage.js';
import { diskBootPlans } from './_disk.js';

export const Params = z
  .object({
    /** zlib-compress clusters (about 2.5x smaller for a fresh rootfs, ~15 s slower). */
    compress: z.boolean().default(true),
    cluster_size: z.enum(['65536', '131072', '262144', '524288', '1048576', '2097152']).default('65536'),
  })
  .strict();

export function convertArgs(p: z.infer<typeof Params>, src: string, dst: string): string[] {
  const opts = [`compat=1.1`, `cluster_size=${p.cluster_size}`, 'lazy_refcounts=off', 'preallocation=off', 'compression_type=zlib'];
  const args = ['convert', '-f', 'raw', '-O', 'qcow2', '-o', opts.join(',')];
  if (p.compress) args.push('-c');
  args.push(src, dst);
  return args;
}

export default defineStage({
  kind: 'qcow2',
  version: '1',
  summary: 'qcow2 disk converted from a raw disk (qemu-img, deterministic options)',
  params: Params,
  inputs: ['disk'],
  tools: () => [{ name: 'qemu-img', apt: 'qemu-utils' }],
  async run(ctx) {
    const out = join(ctx.outDir, 'disk.qcow2');
    await ctx.exec('qemu-img', convertArgs(ctx.params, ctx.input('disk', 'disk.raw'), out));
    await ctx.exec('qemu-img', ['check', '-f', 'qcow2', out]);
    ctx.setMeta({ ...ctx.inputs.disk!.meta, format: 'qcow2', compressed: ctx.params.compress });
  },
  boot: (ctx) => diskBootPlans(ctx, 'disk.qcow2', 'qcow2', 'qcow2 disk'),
});
