// Stage work dirs in RAM. A build root (mmdebstrap's chroot, dracut's overlay) is
// thrown away when its stage ends, yet on a disk it pays for the journal, dpkg's
// database syncs and the deletes: on this project's reference machine (ext4 with
// online discard, ~3.7 ms per fsync) mmdebstrap took 24 s with its chroot on disk
// and 16.6 s in RAM. A kind that builds such a throwaway tree declares how big it
// usually gets (StageModule.memoryWorkDir); its work dir is then a private tmpfs
// mounted on the usual staging dir, when the machine is root and has room to spare.
// Outputs stay on the cache's file system (they are renamed into blobs).
//
// Nothing leaks on a kill -9 that a disk work dir would not: the tmpfs is mounted
// on an owner-named dir under the cache's tmp/, and the next build (cleanStaging →
// safeRemove) unmounts it like any mount a killed chroot left there.
// PIPELINE_SCRATCH=disk turns this off; PIPELINE_SCRATCH=<size> (e.g. 4G) caps the RAM
// one work dir may take.
import { promises as fs, readFileSync } from 'node:fs';
import type { Cache } from './cache.js';
import { safeRemove } from './fsutil.js';
import { runProcess } from './process.js';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
/** What a memory work dir leaves the rest of the machine, at least. */
const MARGIN = GiB;

export interface ScratchChoice {
  memory: boolean;
  /** The tmpfs's size limit (it only takes what is written). */
  size: number;
  why: string;
}

/**
 * Pure: RAM or disk for a work dir of about `want` bytes, given what the machine has
 * available now and what this process's other memory work dirs may still take. The
 * tmpfs may grow to everything available but a margin, so a tree bigger than the
 * kind's estimate still fits; a stage that does fill it is retried on disk.
 */
export function chooseScratch(o: { want: number | undefined; memAvailable: number | undefined; reserved: number; mode: string | undefined; root: boolean }): ScratchChoice {
  const disk = (why: string): ScratchChoice => ({ memory: false, size: 0, why });
  if (!o.want) return disk('the kind keeps its work dir on disk');
  if (o.mode === 'disk') return disk('PIPELINE_SCRATCH=disk');
  if (!o.root) return disk('mounting a tmpfs needs root');
  if (o.memAvailable === undefined) return disk('no /proc/meminfo');
  const cap = parseSize(o.mode);
  if (o.mode && o.mode !== 'auto' && cap === undefined) return disk(`PIPELINE_SCRATCH=${o.mode} is not auto, disk or a size such as 4G`);
  const room = Math.min(o.memAvailable - o.reserved - MARGIN, cap ?? Infinity);
  if (room < 2 * o.want) {
    if (cap !== undefined && cap < 2 * o.want) return disk(`PIPELINE_SCRATCH=${o.mode} is less than twice the ${mib(o.want)} it needs`);
    return disk(`${mib(o.memAvailable)} available, ${mib(o.reserved)} held by running stages: less than twice the ${mib(o.want)} it needs plus ${mib(MARGIN)}`);
  }
  return { memory: true, size: Math.floor(room / MiB) * MiB, why: `up to ${mib(room)} in RAM` };
}

/** PIPELINE_SCRATCH's size form: bytes, or a number with K, M or G (binary units). */
export function parseSize(v: string | undefined): number | undefined {
  const m = /^(\d+)([KMG]?)$/i.exec(v?.trim() ?? '');
  if (!m) return undefined;
  return Number(m[1]) * 1024 ** ' KMG'.indexOf((m[2] || ' ').toUpperCase());
}

function mib(n: number): string {
  return `${Math.round(n / MiB)} MiB`;
}

/** MemAvailable from /proc/meminfo, in bytes. */
export function memAvailable(text = readMeminfo()): number | undefined {
  const m = /^MemAvailable:\s+(\d+) kB$/m.exec(text ?? '');
  return m ? Number(m[1]) * 1024 : undefined;
}

function readMeminfo(): string | undefined {
  try {
    return readFileSync('/proc/meminfo', 'utf8');
  } catch {
    return undefined;
  }
}

/** Bytes this process's live memory work dirs were sized for (their estimates). */
let reserved = 0;

export interface WorkDir {
  dir: string;
  memory: boolean;
  /** One line for the stage log: where the work dir is and why. */
  note: string;
  /** After the stage: nearly full, so a failure may be for lack of room (then retry on disk). */
  full(): Promise<boolean>;
  remove(): Promise<void>;
}

/** A staging dir for a stage's scratch: a private tmpfs when choose says so, else plain disk. */
export async function stageWorkDir(cache: Cache, label: string, want: number | undefined, opts: { forceDisk?: boolean } = {}): Promise<WorkDir> {
  const dir = await cache.staging(label);
  const choice = opts.forceDisk
    ? { memory: false, size: 0, why: 'retrying on disk' }
    : chooseScratch({ want, memAvailable: memAvailable(), reserved, mode: process.env.PIPELINE_SCRATCH, root: process.getuid?.() === 0 });
  const onDisk: WorkDir = { dir, memory: false, note: `work dir on disk (${choice.why})`, full: async () => false, remove: () => safeRemove(dir) };
  if (!choice.memory) return onDisk;
  try {
    // mode 0755 like the disk staging dir it covers (apt's _apt user walks into the chroot);
    // no nosuid/nodev/noexec: a chroot in it must behave as on disk.
    await runProcess('mount', ['-t', 'tmpfs', '-o', `size=${choice.size},mode=0755`, 'pipeline-scratch', dir], { capture: true });
  } catch (e) {
    return { ...onDisk, note: `work dir on disk (tmpfs mount failed: ${e instanceof Error ? e.message.split('\n')[0] : String(e)})` };
  }
  reserved += want!;
  let released = false;
  return {
    dir,
    memory: true,
    note: `work dir in RAM (tmpfs, ${choice.why})`,
    full: async () => {
      const s = await fs.statfs(dir).catch(() => undefined);
      return s !== undefined && s.bavail * s.bsize < Math.max(64 * MiB, 0.05 * s.blocks * s.bsize);
    },
    remove: async () => {
      if (!released) reserved -= want!;
      released = true;
      await safeRemove(dir);
    },
  };
}
