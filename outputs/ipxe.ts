// iPXE chainload bundle: kernel, initramfs and a boot.ipxe script that fetches
// them by relative URL, so the directory can be served as-is (HTTP or TFTP).
import { rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { defineStage } from '../src/stage.js';
import { directKernelBoot } from '../src/boot/boot.js';
import { copyKernelInitrd, defaultCmdline } from './kernel-initrd.js';

export const Params = z
  .object({
    /** Kernel command line written into boot.ipxe; default: serial console only. */
    cmdline: z
      .string()
      // One iPXE script line: a newline would inject script commands.
      .regex(/^[^\n\r]*$/, 'cmdline must be a single line')
      .optional(),
  })
  .strict();

export function ipxeScript(cmdline: string): string {
  // initrd=<name> lets the kernel find the initrd when iPXE boots it via EFI stub.
  const args = ['initrd=initrd.img', cmdline.trim()].filter(Boolean).join(' ');
  return ['#!ipxe', `kernel vmlinuz ${args}`, 'initrd initrd.img', 'boot', ''].join('\n');
}

export default defineStage({
  kind: 'ipxe',
  version: '1',
  summary: 'iPXE chainload bundle: vmlinuz, initrd.img, boot.ipxe',
  params: Params,
  inputs: ['boot'],
  tools: () => [],
  async run(ctx) {
    await copyKernelInitrd(ctx.inputs, ctx.outDir);
    const tmp = join(ctx.outDir, '.boot.ipxe.partial');
    await writeFile(tmp, ipxeScript(defaultCmdline(ctx.arch, ctx.params.cmdline)), { mode: 0o644 });
    await rename(tmp, join(ctx.outDir, 'boot.ipxe'));
  },
  boot(ctx) {
    const cmdline = defaultCmdline(ctx.arch, ctx.params.cmdline);
    const plans = [
      directKernelBoot(
        ctx.arch,
        join(ctx.dir, 'vmlinuz'),
        join(ctx.dir, 'initrd.img'),
        cmdline,
        'ipxe kernel+initrd (direct boot)',
      ),
    ];
    // arm64 has no network-boot plan: it would need iPXE built for arm64 EFI under
    // AAVMF, and Debian bookworm's ipxe/ipxe-qemu ship x86 binaries only
    // (ipxe.efi, snponly.efi are x86-64 PE). The direct boot covers the kernel,
    // initramfs and the cmdline that boot.ipxe carries.
    if (ctx.arch === 'amd64') {
      // The real consumer: the NIC's iPXE ROM (ipxe-qemu) gets boot.ipxe from qemu's
      // built-in DHCP/TFTP (user-mode netdev, no host networking) and follows it.
      plans.push({
        qemu: 'qemu-system-x86_64',
        args: [
          '-netdev',
          // qemu option syntax: a literal comma in a value is written ',,'.
          `user,id=n0,tftp=${ctx.dir.replace(/,/g, ',,')},bootfile=boot.ipxe`,
          '-device',
          'virtio-net-pci,netdev=n0',
          '-boot',
          'n',
        ],
        label: 'ipxe network boot (iPXE ROM, TFTP)',
      });
    }
    return plans;
  },
});
