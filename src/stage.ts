// The contract between the engine and every stage (stages/*.ts) and emitter
// (outputs/*.ts). A module default-exports a StageModule; the engine discovers
// modules by directory listing, so adding a kind never touches the engine.
import { z } from 'zod';

// The arch table lives in src/arch.ts; re-exported here so kinds import one module.
import type { Arch } from './arch.js';
export { ARCH, ARCHES, emulatorTools, hostArch, type Arch, type ArchInfo } from './arch.js';

/**
 * How a spec path's tree is treated: `copy` — symlinks inside it are copied as
 * symlinks and never followed (an overlay's links point into the image);
 * `reject` — any symlink inside it is an error (the kind follows links).
 */
export interface SpecPathRule {
  type: 'dir' | 'file';
  symlinks: 'copy' | 'reject';
}

/** Params tagged with specPath(); the engine checks every such value at validate/plan time. */
export const specPaths = z.registry<SpecPathRule>();

/**
 * A param naming a file or directory relative to the spec. The engine checks it
 * centrally (relative, inside the spec dir after resolving symlinks, its tree per
 * `rule`) and reports the spec's file:line:col; kinds open it with resolveSpecPath.
 */
export function specPath(rule: SpecPathRule): z.ZodString {
  const s = z.string().min(1);
  specPaths.add(s, rule);
  return s;
}

/** An external program a stage runs. Its version goes into the cache key. */
export interface ToolSpec {
  /** Executable name looked up on PATH, e.g. "mmdebstrap". */
  name: string;
  /** Debian package that provides it (for `doctor` and error messages). */
  apt: string;
  /**
   * Debian packages the tool needs at run time that the stage never runs itself
   * (e.g. mmdebstrap calls arch-test for a foreign arch). Checked with dpkg-query
   * by the build preflight and doctor, installed by scripts/setup; their versions
   * are not part of cache keys.
   */
  packages?: string[];
  /** Arguments that make it print its version; default ["--version"]. */
  versionArgs?: string[];
}

/** A finished input as a downstream stage sees it: a read-only directory. */
export interface StageInput {
  /** Absolute path of a directory holding the producing stage's files. Never write here. */
  dir: string;
  /** Relative paths of the files in dir, sorted. */
  files: string[];
  /** Deterministic metadata the producer recorded (package list, kernel version, …). */
  meta: Record<string, unknown>;
  /** Cache key of the producing stage. */
  key: string;
  /** Kind of the producing stage. */
  kind: string;
}

export interface ExecOptions {
  cwd?: string;
  env?: Record<string, string | undefined>;
  /** Bytes or text fed to stdin. */
  input?: string | Buffer;
  /** Capture stdout and return it (otherwise it goes to the stage log). */
  capture?: boolean;
  /** Kill the process after this many milliseconds. */
  timeoutMs?: number;
}

export interface ExecResult {
  stdout: string;
  stderr: string;
  exitCode: number;
}

export interface RunContext<P> {
  /** Stage name in the spec, e.g. "rootfs". */
  name: string;
  arch: Arch;
  params: P;
  sourceDateEpoch: number;
  /**
   * Empty directory, private to this run: write the stage's outputs straight here
   * (regular files only). The engine drops it if the stage fails, so no temp names.
   */
  outDir: string;
  /** Empty scratch directory, removed after the stage whatever happens. */
  workDir: string;
  /** Inputs by the name the stage declared. */
  inputs: Record<string, StageInput>;
  /** Directory of the spec file; repo-relative assets (dracut modules, units) resolve here. */
  specDir: string;
  /** Aborted when the build is cancelled (another stage failed, Ctrl-C). */
  signal: AbortSignal;
  /**
   * Run a program with an argument array (never a shell string). Output goes to the
   * stage log; a non-zero exit throws a StageError carrying the log tail. The whole
   * process group is killed on cancellation.
   */
  exec(cmd: string, args: string[], opts?: ExecOptions): Promise<ExecResult>;
  /** A line for the stage log (shown on failure, or with --verbose). */
  log(line: string): void;
  /** Record deterministic metadata for the manifest and downstream stages. */
  setMeta(meta: Record<string, unknown>): void;
  /** Absolute path of `file` in input `name`; a StageError naming the input's files if it is not there. */
  input(name: string, file: string): string;
  /** The rootfs tarball of input `name` (default "rootfs"): its rootfs.tar, or its only *.tar. */
  rootfsTar(name?: string): string;
  /**
   * Input `name`'s rootfs tarball unpacked with owners, modes, device nodes, xattrs
   * and mtimes (needs root: declare `requires: ['root']`). Unpacked once per rootfs
   * entry under the cache and shared by every stage and build that asks: READ-ONLY,
   * never write into it (dracut writes to an overlay of it in its own namespace).
   */
  rootfsTree(name?: string): Promise<string>;
}

/** How `pipeline test` boots an emitter's artifact under qemu. */
export interface BootPlan {
  /** qemu binary, e.g. qemu-system-x86_64. */
  qemu: string;
  /** Arguments after the engine's own (-nographic, -no-reboot, -serial, accel). Paths are absolute. */
  args: string[];
  /** Human label, e.g. "ipxe kernel+initrd (direct boot)". */
  label: string;
}

export interface BootContext<P> {
  arch: Arch;
  params: P;
  /** Directory holding the emitter's published files. */
  dir: string;
  /** Firmware to use where the emitter supports several ("bios" | "uefi"). */
  firmware?: string;
  /** Scratch directory for copies qemu may write to. */
  workDir: string;
}

export interface StageModule<S extends z.ZodType = z.ZodType> {
  /** The `kind:` value in a spec. */
  kind: string;
  /** Bump on any change to what the stage produces: it is part of every cache key. */
  version: string;
  /** One line for `plan`/`summary` and docs. */
  summary: string;
  /** Option schema for the stage's `with:` block. Defaults live here. */
  params: S;
  /** Named inputs the stage needs (`inputs: {rootfs: <stage>}` in the spec). */
  inputs: readonly string[];
  /** Inputs a spec may give but need not (the kind checks what it needs in checkInputs). */
  optionalInputs?: readonly string[];
  /** Architectures the stage supports (default: all). */
  arches?: readonly Arch[];
  /** Heavy stages (big downloads, chroots, filesystem builds) run one at a time. */
  heavy?: boolean;
  /**
   * Bytes of throwaway tree the stage usually builds in its workDir (a chroot, an
   * overlay). When set, the engine may put workDir on a private tmpfs if the machine
   * has twice that to spare (src/engine/scratch.ts); the stage must not rename or
   * hardlink between workDir and outDir, which can then be different file systems.
   */
  memoryWorkDir?: number;
  /**
   * What the host must offer when the stage runs (checked before a build starts):
   * root privileges, loop devices, or running the target arch's binaries (binfmt).
   */
  requires?: readonly ('root' | 'loop' | 'foreign-exec')[];
  /**
   * Host environment variables the kind's tools may receive, beyond the engine's
   * allow-list (PATH, LC_ALL, TZ, SOURCE_DATE_EPOCH, HOME, TMPDIR, proxies). Names
   * starting with PIPELINE_ or containing SECRET/TOKEN/PASSWORD/KEY/CREDENTIAL are
   * refused: the stage fails before it runs anything.
   */
  env?: readonly string[];
  /** External programs it runs on the host, given its params. */
  tools(params: z.infer<S>, arch: Arch): ToolSpec[];
  /**
   * Files and directories (relative to the spec dir) whose contents shape the output,
   * e.g. a dracut module directory. They are hashed into the cache key.
   */
  assets?(params: z.infer<S>, arch: Arch): string[];
  /**
   * Plan-time checks against the stages feeding this one (their kinds and resolved
   * params), e.g. a Debian component the input's rootfs must name. Each message
   * becomes a spec error (exit 2) at this stage's inputs.
   */
  checkInputs?(params: z.infer<S>, inputs: Record<string, { kind: string; params: unknown }>, arch: Arch): string[];
  run(ctx: RunContext<z.infer<S>>): Promise<void>;
  /**
   * Emitters that produce something bootable describe how to boot it (async when the
   * plan needs files read out of the artifact first, e.g. rpi4's kernel from its FAT).
   */
  boot?(ctx: BootContext<z.infer<S>>): BootPlan | BootPlan[] | Promise<BootPlan | BootPlan[]>;
}

/** A failure inside a stage: message for the user plus the tail of its log. */
export class StageError extends Error {
  constructor(
    message: string,
    readonly logTail: string = '',
  ) {
    super(message);
    this.name = 'StageError';
  }
}

export function defineStage<S extends z.ZodType>(m: StageModule<S>): StageModule<S> {
  return m;
}
