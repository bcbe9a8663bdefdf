// Kernel + initramfs published as-is, for direct kernel boot (qemu -kernel/-initrd),
// with the command line to pass them in `cmdline` (what `pipeline test` boots with).
import { readFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { defineStage } from '../src/stage.js';
import { directKernelBoot } from '../src/boot/boot.js';
import { copyKernelInitrd, kernelCmdline } from './_boot.js';

export const Params = z
  .object({
    /** Kernel command line for booting (the boot test uses it); default: serial console only. */
    cmdline: z.string().optional(),
  })
  .strict();

export default defineStage({
  kind: 'kernel-initrd',
  // 2: publishes `cmdline`, so the boot test boots what was published.
  version: '2',
  summary: 'vmlinuz + initrd.img + cmdline for direct kernel boot',
  params: Params,
  inputs: ['boot'],
  tools: () => [],
  async run(ctx) {
    await copyKernelInitrd(ctx);
    await writeFile(join(ctx.outDir, 'cmdline'), kernelCmdline(ctx.arch, ctx.params.cmdline) + '\n', { mode: 0o644 });
  },
  boot(ctx) {
    return directKernelBoot(
      ctx.arch,
      join(ctx.dir, 'vmlinuz'),
      join(ctx.dir, 'initrd.img'),
      readFileSync(join(ctx.dir, 'cmdline'), 'utf8').trim(),
      'kernel+initrd (direct boot)',
    );
  },
});
