// Kernel + initramfs published as-is, for direct kernel boot (qemu -kernel/-initrd).
import { chmod, copyFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { defineStage, StageError } from '../src/stage.js';
import { directKernelBoot, SERIAL_CONSOLE } from '../src/boot.js';

export const Params = z
  .object({
    /** Command line for booting (the boot test uses it); default: serial console only. */
    cmdline: z.string().optional(),
  })
  .strict();

export const FILES = ['vmlinuz', 'initrd.img'] as const;

/** Copy (never hardlink: outputs must not alias cache entries) through a temp name. */
export async function copyOut(fromDir: string, toDir: string, name: string): Promise<void> {
  const tmp = join(toDir, `.${name}.partial`);
  await copyFile(join(fromDir, name), tmp);
  await chmod(tmp, 0o644);
  await rename(tmp, join(toDir, name));
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
    const boot = ctx.inputs.boot;
    for (const f of FILES) {
      if (!boot.files.includes(f)) throw new StageError(`input boot has no ${f} (files: ${boot.files.join(', ')})`);
      await copyOut(boot.dir, ctx.outDir, f);
    }
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
