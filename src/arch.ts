// The arch table: everything that differs between target architectures, in one row
// per arch. Engine, stages, emitters, doctor and boot code read it instead of
// spelling arch values themselves, so another arch (riscv64) is one row here plus
// whatever kind code its boot path really needs.
import type { ToolSpec } from './stage.js';

export const ARCHES = ['amd64', 'arm64'] as const;
export type Arch = (typeof ARCHES)[number];

export type Firmware = 'bios' | 'uefi';

export interface ArchInfo {
  /** Debian's name (dpkg --print-architecture, mmdebstrap --arch). */
  debian: Arch;
  /** Node's process.arch on a machine of this arch. */
  node: NodeJS.Architecture;
  /** GNU/kernel name (uname -m), which qemu names its emulators after. */
  gnu: string;
  /** qemu-user binfmt entry (binfmt-support name); the static emulator is `<name>-static`. */
  qemuUser: string;
  /** qemu-system emulator that boots this arch, and its Debian package. */
  qemuSystem: ToolSpec;
  /**
   * Machine and CPU for boots. arm64: `virt` with a Cortex-A57 — under TCG `-cpu max`
   * spends most of its time emulating pointer authentication.
   */
  qemuMachine: string[];
  /** qemu's NICs carry an iPXE ROM for this arch (Debian's ipxe-qemu: x86 only), so a network boot can be tested. */
  qemuIpxeRom: boolean;
  /** Serial console of that qemu machine (and of the usual boards), for console=. */
  serialConsole: string;
  /** OCI image-config platform. */
  oci: { architecture: string; os: 'linux'; variant?: string };
  /** Firmware kinds a disk of this arch boots under, in boot-test order. */
  firmwares: readonly Firmware[];
  /** UEFI: GRUB's platform, the removable-media loader name (\EFI\BOOT\<name>), systemd-boot's binary. */
  efi: { grubTarget: 'x86_64-efi' | 'arm64-efi'; removable: string; systemdBoot: string };
  /** GPT type of the root partition (Discoverable Partitions Specification). */
  gptRootType: string;
  /** UEFI firmware for boot tests: code (read-only pflash), vars template (copied per boot). */
  uefiFirmware: { code: string; vars: string; apt: string };
  /** Debian's kernel image: metapackage and the kind of image /boot/vmlinuz-<v> holds. */
  kernel: { package: string; image: 'bzImage' | 'Image' };
}

export const ARCH: Record<Arch, ArchInfo> = {
  amd64: {
    debian: 'amd64',
    node: 'x64',
    gnu: 'x86_64',
    qemuUser: 'qemu-x86_64',
    qemuSystem: { name: 'qemu-system-x86_64', apt: 'qemu-system-x86' },
    qemuMachine: [],
    qemuIpxeRom: true,
    serialConsole: 'ttyS0',
    oci: { architecture: 'amd64', os: 'linux' },
    firmwares: ['bios', 'uefi'],
    efi: { grubTarget: 'x86_64-efi', removable: 'BOOTX64.EFI', systemdBoot: 'systemd-bootx64.efi' },
    gptRootType: '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709',
    uefiFirmware: { code: '/usr/share/OVMF/OVMF_CODE_4M.fd', vars: '/usr/share/OVMF/OVMF_VARS_4M.fd', apt: 'ovmf' },
    kernel: { package: 'linux-image-amd64', image: 'bzImage' },
  },
  arm64: {
    debian: 'arm64',
    node: 'arm64',
    gnu: 'aarch64',
    qemuUser: 'qemu-aarch64',
    qemuSystem: { name: 'qemu-system-aarch64', apt: 'qemu-system-arm' },
    qemuMachine: ['-M', 'virt', '-cpu', 'cortex-a57'],
    qemuIpxeRom: false,
    serialConsole: 'ttyAMA0',
    oci: { architecture: 'arm64', os: 'linux', variant: 'v8' },
    firmwares: ['uefi'],
    efi: { grubTarget: 'arm64-efi', removable: 'BOOTAA64.EFI', systemdBoot: 'systemd-bootaa64.efi' },
    gptRootType: 'B921B045-1DF0-41C3-AF44-4C6F280D3FAE',
    uefiFirmware: { code: '/usr/share/AAVMF/AAVMF_CODE.fd', vars: '/usr/share/AAVMF/AAVMF_VARS.fd', apt: 'qemu-efi-aarch64' },
    kernel: { package: 'linux-image-arm64', image: 'Image' },
  },
};

/** The Debian arch of the machine we run on (undefined if it is none we build for). */
export function hostArch(): Arch | undefined {
  return ARCHES.find((a) => ARCH[a].node === process.arch);
}

/** The qemu-user emulator a stage runs target binaries through, when the arch is foreign. */
export function emulatorTools(arch: Arch): ToolSpec[] {
  // binfmt-support registers the emulator with binfmt_misc where systemd does not (containers).
  return hostArch() === arch ? [] : [{ name: `${ARCH[arch].qemuUser}-static`, apt: 'qemu-user-static', packages: ['binfmt-support'] }];
}

/** The arch whose qemu-system binary this is (undefined for another binary). */
export function archOfQemu(qemu: string): Arch | undefined {
  return ARCHES.find((a) => ARCH[a].qemuSystem.name === qemu);
}
