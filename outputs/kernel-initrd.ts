// Kernel + initramfs published as-is, for direct kernel boot (qemu -kernel/-initrd).
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
  version: '1',
  summary: 'vmlinuz + initrd.img for direct kernel boot',
  params: Params,
  inputs: ['boot'],
  tools: () => [],
  async run(ctx) {
    await copyKernelInitrd(ctx);
  },
  boot(ctx) {
    // The bundle carries no command line of its own (a file for it would change
    // the artifact): the boot test uses the one the spec gives this stage.
    return directKernelBoot(
      ctx.arch,
      join(ctx.dir, 'vmlinuz'),
      join(ctx.dir, 'initrd.img'),
      kernelCmdline(ctx.arch, ctx.params.cmdline),
      'kernel+initrd (direct boot)',
    );
  },
});
