// Kernel + initramfs published as-is, for direct kernel boot (qemu -kernel/-initrd).
import { chmod, copyFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { defineStage, inputFile, type StageInput } from '../src/stage.js';
import { directKernelBoot, SERIAL_CONSOLE } from '../src/boot/boot.js';

export const Params = z
  .object({
    /** Command line for booting (the boot test uses it); default: serial console only. */
    cmdline: z.string().optional(),
  })
  .strict();

export const FILES = ['vmlinuz', 'initrd.img'] as const;

/**
 * Copy the boot input's kernel and initramfs to outDir (never hardlink: outputs
 * must not alias cache entries), each through a temp name.
 */
export async function copyKernelInitrd(inputs: Record<string, StageInput>, outDir: string): Promise<void> {
  for (const name of FILES) {
    const tmp = join(outDir, `.${name}.partial`);
    await copyFile(inputFile(inputs, 'boot', name), tmp);
    await chmod(tmp, 0o644);
    await rename(tmp, join(outDir, name));
  }
}

export function defaultCmdline(arch: 'amd64' | 'arm64', cmdline?: string): string {
  return cmdline ?? `console=${SERIAL_CONSOLE[arch]}`;
}

export default defineStage({
  kind: 'kernel-initrd',
  version: '1',
  summary: 'vmlinuz + initrd.img for direct kernel boot',
  params: Params,
  inputs: ['boot'],
  tools: () => [],
  async run(ctx) {
    await copyKernelInitrd(ctx.inputs, ctx.outDir);
  },
  boot(ctx) {
    return directKernelBoot(
      ctx.arch,
      join(ctx.dir, 'vmlinuz'),
      join(ctx.dir, 'initrd.img'),
      defaultCmdline(ctx.arch, ctx.params.cmdline),
      'kernel+initrd (direct boot)',
    );
  },
});
