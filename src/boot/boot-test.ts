// `pipeline test`: boot every published artifact that knows how to boot under
// qemu and require the spec's markers on the serial console.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { bootTest, effectiveAccel } from './boot.js';
import type { BuildResult } from '../engine/build.js';
import { chooseAccel } from '../doctor/doctor.js';
import { UsageError } from '../engine/errors.js';
import { fmt } from '../cli/progress.js';
import { variantInfo } from '../engine/spec.js';
import type { BootPlan } from '../stage.js';

export interface BootTestOptions {
  firmware?: string;
  accel?: string;
  json?: boolean;
  verbose?: boolean;
  signal?: AbortSignal;
}

export async function runBootTests(r: BuildResult, o: BootTestOptions): Promise<boolean> {
  const { plan, loaded, cache } = r.prepared;
  if (o.accel && o.accel !== 'kvm' && o.accel !== 'tcg') throw new UsageError(`--accel must be kvm or tcg, got "${o.accel}"`);
  const accel = (o.accel as 'kvm' | 'tcg' | undefined) ?? (await chooseAccel(cache.root));
  let ok = true;
  for (const pub of r.published) {
    const info = variantInfo(loaded.spec, pub.variant)!;
    if (!info.bootTest) throw new UsageError(`variant "${pub.variant}" has no boot_test in ${path.basename(loaded.file)} (add boot_test: {expect: [MARKER]})`);
    const plans: BootPlan[] = [];
    const work = await cache.staging(`boot-${pub.variant}`);
    try {
      for (const sinkName of plan.sinks[pub.variant]!) {
        const st = plan.stages.find((s) => s.name === sinkName)!;
        if (!st.mod.boot) continue;
        const got = await st.mod.boot({ arch: plan.arch, params: st.params, dir: pub.dir, workDir: work, firmware: o.firmware });
        plans.push(...(Array.isArray(got) ? got : [got]));
      }
      if (!plans.length) throw new UsageError(`variant "${pub.variant}" produces nothing bootable${o.firmware ? ` with firmware ${o.firmware}` : ''}`);
      for (const bp of plans) {
        const used = effectiveAccel(bp.qemu, accel); // foreign-arch emulators always run TCG
        const logFile = path.join(cache.root, 'logs', plan.spec.name, plan.arch, `boot-${pub.variant}-${bp.label.replace(/[^A-Za-z0-9._-]+/g, '_')}.log`);
        await fs.mkdir(path.dirname(logFile), { recursive: true });
        const res = await bootTest(bp, {
          expect: info.bootTest.expect,
          forbid: info.bootTest.forbid,
          timeoutMs: info.bootTest.timeout * 1000,
          memory: info.bootTest.memory,
          accel: used,
          signal: o.signal,
          logFile,
          onLine: o.verbose ? (l: string) => process.stderr.write(`    │ ${l}\n`) : undefined,
        });
        ok &&= res.ok;
        if (o.json) {
          process.stdout.write(JSON.stringify({ event: 'boot-test', variant: pub.variant, label: bp.label, accel: used, ...res }) + '\n');
        } else if (res.ok) {
          process.stderr.write(`  ✓ boot ${pub.variant}/${plan.arch} ${bp.label}: ${res.matched.join(', ')} in ${fmt(res.seconds)} (${used})\n`);
        } else {
          const why = res.forbidden.length ? `forbidden output: ${res.forbidden.join(', ')}` : `missing marker(s): ${res.missing.join(', ')} after ${fmt(res.seconds)}`;
          process.stderr.write(`  ✗ boot ${pub.variant}/${plan.arch} ${bp.label}: ${why}\n${res.logTail.split('\n').map((l) => `    │ ${l}`).join('\n')}\n    full console log: ${logFile}\n`);
        }
      }
    } finally {
      await fs.rm(work, { recursive: true, force: true });
    }
  }
  return ok;
}
