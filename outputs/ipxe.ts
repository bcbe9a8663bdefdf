// iPXE chainload bundle: kernel, initramfs and a boot.ipxe script that fetches
// them by relative URL, so the directory can be served as-is (HTTP or TFTP).
import { readFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { ARCH, defineStage, StageError } from '../src/stage.js';
import { directKernelBoot } from '../src/boot/boot.js';
import { copyKernelInitrd, joinCmdline, kernelCmdline } from './_boot.js';

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
  return ['#!ipxe', `kernel vmlinuz ${joinCmdline('initrd=initrd.img', cmdline)}`, 'initrd initrd.img', 'boot', ''].join('\n');
}

export interface IpxeBoot {
  /** File names relative to the script's directory. */
  kernel: string;
  initrd: string;
  /** The kernel's arguments exactly as iPXE passes them. */
  args: string;
}

/** What a boot.ipxe of ours boots: its kernel and initrd lines (relative file names only). */
export function parseIpxeScript(text: string): IpxeBoot {
  const lines = text.split('\n').map((l) => l.trim());
  if (lines[0] !== '#!ipxe') throw new StageError('boot.ipxe does not start with #!ipxe');
  const kernelLine = lines.find((l) => /^kernel\s/.test(l));
  const initrdLine = lines.find((l) => /^initrd\s/.test(l));
  if (!kernelLine || !initrdLine) throw new StageError('boot.ipxe has no kernel or no initrd line');
  const [, kernel = '', args = ''] = /^kernel\s+(\S+)\s*(.*)$/.exec(kernelLine) ?? [];
  const initrd = initrdLine.split(/\s+/)[1] ?? '';
  for (const f of [kernel, initrd]) {
    // The boot test serves the published directory: a URL or a path out of it is not ours to boot.
    if (!/^[A-Za-z0-9._-]+$/.test(f) || f === '.' || f === '..') throw new StageError(`boot.ipxe names "${f}", not a file in its own directory`);
  }
  return { kernel, initrd, args };
}

export default defineStage({
  kind: 'ipxe',
  version: '1',
  summary: 'iPXE chainload bundle: vmlinuz, initrd.img, boot.ipxe',
  params: Params,
  inputs: ['boot'],
  tools: () => [],
  async run(ctx) {
    await copyKernelInitrd(ctx);
    await writeFile(join(ctx.outDir, 'boot.ipxe'), ipxeScript(kernelCmdline(ctx.arch, ctx.params.cmdline)), { mode: 0o644 });
  },
  boot(ctx) {
    // Boot what was published: the kernel, initrd and arguments boot.ipxe names.
    const script = parseIpxeScript(readFileSync(join(ctx.dir, 'boot.ipxe'), 'utf8'));
    const plans = [
      directKernelBoot(ctx.arch, join(ctx.dir, script.kernel), join(ctx.dir, script.initrd), script.args, 'ipxe kernel+initrd (direct boot)'),
    ];
    // arm64 has no network-boot plan: it would need iPXE built for arm64 EFI under
    // AAVMF, and Debian bookworm's ipxe/ipxe-qemu ship x86 binaries only
    // (ipxe.efi, snponly.efi are x86-64 PE). The direct boot covers the kernel,
    // initramfs and the cmdline that boot.ipxe carries.
    if (ARCH[ctx.arch].qemuIpxeRom) {
      // The real consumer: the NIC's iPXE ROM (ipxe-qemu) gets boot.ipxe from qemu's
      // built-in DHCP/TFTP (user-mode netdev, no host networking) and follows it.
      plans.push({
        qemu: ARCH[ctx.arch].qemuSystem.name,
        args: [
          ...ARCH[ctx.arch].qemuMachine,
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
