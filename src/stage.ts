// The contract between the engine and every stage (stages/*.ts) and emitter
// (outputs/*.ts). A module default-exports a StageModule; the engine discovers
// modules by directory listing, so adding a kind never touches the engine.
import type { z } from 'zod';

export const ARCHES = ['amd64', 'arm64'] as const;
export type Arch = (typeof ARCHES)[number];

/** The Debian arch of the machine we run on (undefined if it is neither). */
export function hostArch(): Arch | undefined {
  return process.arch === 'x64' ? 'amd64' : process.arch === 'arm64' ? 'arm64' : undefined;
}

/** The qemu-user emulator a stage runs target binaries through, when the arch is foreign. */
export function emulatorTools(arch: Arch): ToolSpec[] {
  const name = { amd64: 'qemu-x86_64-static', arm64: 'qemu-aarch64-static' }[arch];
  return hostArch() === arch ? [] : [{ name, apt: 'qemu-user-static' }];
}

/** An external program a stage runs. Its version goes into the cache key. */
export interface ToolSpec {
  /** Executable name looked up on PATH, e.g. "mmdebstrap". */
  name: string;
  /** Debian package that provides it (for `doctor` and error messages). */
  apt: string;
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
  /** Empty directory: write the stage's outputs here (relative paths, regular files only). */
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
  /** Architectures the stage supports (default: all). */
  arches?: readonly Arch[];
  /** Heavy stages (big downloads, chroots, filesystem builds) run one at a time. */
  heavy?: boolean;
  /**
   * What the host must offer when the stage runs (checked before a build starts):
   * root privileges, loop devices, or running the target arch's binaries (binfmt).
   */
  requires?: readonly ('root' | 'loop' | 'foreign-exec')[];
  /** External programs it runs on the host, given its params. */
  tools(params: z.infer<S>, arch: Arch): ToolSpec[];
  /**
   * Files and directories (relative to the spec dir) whose contents shape the output,
   * e.g. a dracut module directory. They are hashed into the cache key.
   */
  assets?(params: z.infer<S>, arch: Arch): string[];
  run(ctx: RunContext<z.infer<S>>): Promise<void>;
  /** Emitters that produce something bootable describe how to boot it. */
  boot?(ctx: BootContext<z.infer<S>>): BootPlan | BootPlan[];
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

/** Absolute path of a file a stage needs from one of its inputs; a clear error if it is not there. */
export function inputFile(inputs: Record<string, StageInput>, input: string, file: string): string {
  const inp = inputs[input];
  if (!inp) throw new StageError(`input "${input}" is missing`);
  if (!inp.files.includes(file)) throw new StageError(`input "${input}" (${inp.kind}) has no ${file} (files: ${inp.files.join(', ') || 'none'})`);
  return `${inp.dir}/${file}`;
}

export function defineStage<S extends z.ZodType>(m: StageModule<S>): StageModule<S> {
  return m;
}
