// Shared by the emitters that publish a kernel and an initramfs (kernel-initrd,
// ipxe) and by every boot path that takes a `cmdline`. Not a kind: files starting
// with `_` are not loaded as kinds (src/engine/kinds.ts).
import { chmod, copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { SERIAL_CONSOLE } from '../src/boot/boot.js';
import type { Arch, RunContext } from '../src/stage.js';

export const KERNEL_FILES = ['vmlinuz', 'initrd.img'] as const;

/**
 * `cmdline` has one meaning in every boot emitter: the whole kernel command line,
 * minus what the emitter must add itself (root=… for a disk, the live-boot
 * arguments for the ISO, initrd= for iPXE). Unset: the arch's serial console only.
 */
export function kernelCmdline(arch: Arch, cmdline?: string): string {
  return cmdline ?? `console=${SERIAL_CONSOLE[arch]}`;
}

/** Words joined by single spaces, empty ones dropped (emitter args + the spec's cmdline). */
export function joinCmdline(...parts: string[]): string {
  return parts.map((p) => p.trim()).filter(Boolean).join(' ');
}

/**
 * Copy the boot input's kernel and initramfs into outDir as 0644 (never hardlink:
 * outputs must not alias cache entries).
 */
export async function copyKernelInitrd(ctx: Pick<RunContext<unknown>, 'input' | 'outDir'>): Promise<void> {
  for (const name of KERNEL_FILES) {
    const dst = join(ctx.outDir, name);
    await copyFile(ctx.input('boot', name), dst);
    await chmod(dst, 0o644);
  }
}
