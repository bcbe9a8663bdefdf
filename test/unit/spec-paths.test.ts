// Spec paths (overlay:, moduleDirs:) never escape the spec's directory: checked
// at validate/plan time with file:line:col, and again when a kind opens them.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { checkSpecPath, checkSpecPaths, digestTree, resolveSpecPath } from '../../src/engine/assets.js';
import { loadSpec, prepare } from '../../src/engine/build.js';
import { SpecError } from '../../src/engine/errors.js';
import { loadKinds } from '../../src/engine/kinds.js';
import { parseSpec } from '../../src/engine/spec.js';
import { StageError } from '../../src/stage.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'spec-paths-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
let n = 0;

/** A fresh spec dir: `spec.yaml` with the given stages, plus an `ok/` overlay and `mods/90x/` module dir. */
function specDir(stages: string, extraVars = ''): { dir: string; file: string } {
  const dir = path.join(tmp, `s${n++}`, 'project');
  mkdirSync(path.join(dir, 'ok', 'etc'), { recursive: true });
  writeFileSync(path.join(dir, 'ok', 'etc', 'motd'), 'hi\n');
  mkdirSync(path.join(dir, 'mods', '90x'), { recursive: true });
  writeFileSync(path.join(dir, 'mods', '90x', 'module-setup.sh'), '#!/bin/sh\n');
  const file = path.join(dir, 'spec.yaml');
  writeFileSync(file, `name: t\narches: [amd64, arm64]\nvars:\n  od: ok\n${extraVars}stages:\n${stages}variants:\n  v: [d]\n`);
  return { dir, file };
}

const STAGES = (overlay: string, moduleDirs = '[mods]') => `  r:\n    kind: mmdebstrap\n    with:\n      overlay: ${overlay}\n  d:\n    kind: dracut\n    inputs: { rootfs: r }\n    with:\n      moduleDirs: ${moduleDirs}\n`;

async function rejected(file: string): Promise<{ line: number; col: number; message: string; path: string }[]> {
  try {
    await loadSpec(file);
  } catch (e) {
    assert.ok(e instanceof SpecError, `expected SpecError, got ${(e as Error)?.stack}`);
    return e.issues.map((i) => ({ line: i.loc.line, col: i.loc.col, message: i.message, path: i.path }));
  }
  assert.fail('expected the spec paths to be rejected');
}

test('good spec paths pass, and resolve to real paths inside the spec dir', async () => {
  const { dir, file } = specDir(STAGES('"${od}"'));
  const { loaded } = await loadSpec(file);
  assert.equal(resolveSpecPath(loaded.dir, 'ok', { type: 'dir', symlinks: 'copy' }), realpathSync(path.join(dir, 'ok')));
});

test('../ and absolute paths are rejected at the value, with what was expected', async () => {
  const up = await rejected(specDir(STAGES('../../x')).file);
  assert.deepEqual([up[0]!.line, up[0]!.col, up[0]!.path], [9, 16, 'stages.r.with.overlay']);
  assert.match(up[0]!.message, /expected a path inside the spec's directory, found "\.\.\/\.\.\/x", which leaves it/);
  const abs = await rejected(specDir(STAGES('/etc')).file);
  assert.match(abs[0]!.message, /expected a path relative to the spec's directory, found the absolute path "\/etc"/);
  const mods = await rejected(specDir(STAGES('ok', '[mods, /etc, ../..]')).file);
  assert.deepEqual(mods.map((i) => [i.line, i.col, i.path]), [[14, 26, 'stages.d.with.moduleDirs[1]'], [14, 32, 'stages.d.with.moduleDirs[2]']]);
});

test('a symlink in the spec dir that points outside it is rejected', async () => {
  const s = specDir(STAGES('link'));
  symlinkSync('/etc', path.join(s.dir, 'link'));
  const e = await rejected(s.file);
  assert.equal(e[0]!.line, 9);
  assert.match(e[0]!.message, /a symlink that resolves to \/etc outside it/);
  // …and so is a path that walks through one.
  const t = specDir(STAGES('link/ssh'));
  symlinkSync('/etc', path.join(t.dir, 'link'));
  assert.match((await rejected(t.file))[0]!.message, /resolves to \/etc\/ssh outside it/);
});

test('module dirs may hold no symlink at all (dracut follows them); overlays copy theirs as links', async () => {
  const s = specDir(STAGES('ok'));
  symlinkSync('/etc/shadow', path.join(s.dir, 'mods', '90x', 'shadow'));
  const e = await rejected(s.file);
  assert.equal(e[0]!.path, 'stages.d.with.moduleDirs[0]');
  assert.match(e[0]!.message, /"mods" contains a symlink \(90x\/shadow -> \/etc\/shadow\); expected only regular files and directories/);
  // A module dir that is itself a link to a host dir:
  const t = specDir(STAGES('ok', '[hostmods]'));
  symlinkSync('/usr/lib', path.join(t.dir, 'hostmods'));
  assert.match((await rejected(t.file))[0]!.message, /outside it/);
  // An overlay's links are copied as links, never followed: allowed, and hashed as link text.
  const o = specDir(STAGES('ok'));
  const outside = path.join(tmp, `outside-${n}`);
  writeFileSync(outside, 'one');
  symlinkSync(outside, path.join(o.dir, 'ok', 'etc', 'escape'));
  await loadSpec(o.file);
  const d1 = await digestTree(path.join(o.dir, 'ok'));
  writeFileSync(outside, 'two');
  assert.equal(await digestTree(path.join(o.dir, 'ok')), d1, 'content outside the spec dir never reaches the key');
});

test('devices, fifos and sockets inside a tree are rejected (reading a fifo would hang plan)', async () => {
  const s = specDir(STAGES('ok'));
  execFileSync('mkfifo', [path.join(s.dir, 'ok', 'etc', 'pipe')]);
  assert.match((await rejected(s.file))[0]!.message, /"ok" contains a fifo \(etc\/pipe\)/);
});

test('missing paths, files where a directory is expected and pipeline: names are errors at the value', async () => {
  assert.match((await rejected(specDir(STAGES('nope')).file))[0]!.message, /expected a directory at "nope" \(next to the spec\), found nothing there/);
  assert.match((await rejected(specDir(STAGES('spec.yaml')).file))[0]!.message, /expected a directory at "spec.yaml", found a file/);
  assert.match((await rejected(specDir(STAGES('ok', '["pipeline:dracut/modules.d"]')).file))[0]!.message, /"pipeline:" names files of the pipeline package/);
});

test('a bad path from a variable or an arch override is located where it was written', async () => {
  const s = specDir(`  r:\n    kind: mmdebstrap\n    with: { overlay: ok }\n    arch:\n      arm64: { with: { overlay: "\${bad}" } }\n  d:\n    kind: dracut\n    inputs: { rootfs: r }\n`, '  bad: { amd64: ok, arm64: /etc }\n');
  const e = await rejected(s.file);
  assert.equal(e.length, 1);
  assert.deepEqual([e[0]!.line, e[0]!.col], [11, 33]);
});

test('plan refuses before hashing anything, and writes nothing', async () => {
  const s = specDir(STAGES('/etc'));
  const cacheDir = path.join(tmp, `cache-${n}`);
  const cwd = process.cwd();
  const empty = path.join(tmp, `cwd-${n}`);
  mkdirSync(empty);
  process.chdir(empty);
  try {
    await assert.rejects(prepare({ file: s.file, arch: 'amd64', variants: ['v'], cacheDir }), SpecError);
  } finally {
    process.chdir(cwd);
  }
  assert.equal(existsSync(cacheDir), false, 'no cache skeleton for a rejected command');
  assert.deepEqual(readdirSync(empty), []);
});

test('kinds re-check at run time: a path swapped for a symlink after plan is refused', () => {
  const s = specDir(STAGES('ok'));
  const rule = { type: 'dir', symlinks: 'copy' } as const;
  assert.ok(!('error' in checkSpecPath(s.dir, 'ok', rule)));
  rmSync(path.join(s.dir, 'ok'), { recursive: true });
  symlinkSync('/etc', path.join(s.dir, 'ok'));
  assert.throws(() => resolveSpecPath(s.dir, 'ok', rule), (e: unknown) => e instanceof StageError && /outside it/.test(e.message));
});

test('checkSpecPaths is separate from the pure parser: parseSpec alone touches no file', async () => {
  const kinds = await loadKinds();
  const text = `name: t\narches: [amd64]\nstages:\n${STAGES('/definitely/not/here')}variants:\n  v: [d]\n`;
  const loaded = parseSpec(text, path.join(tmp, 'virtual.yaml'), kinds);
  const issues = checkSpecPaths(loaded, kinds);
  assert.deepEqual(issues.map((i) => i.path), ['stages.r.with.overlay', 'stages.d.with.moduleDirs[0]']);
});
