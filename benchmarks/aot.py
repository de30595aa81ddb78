"""Compiles var_jax's real programs for a TPU topology on a host without one (deviceless AOT) and reports
compile time, per-chip memory and XLA's cost model. Needs libtpu: a separate venv with
requirements-tpu.txt (docs/benchmarks.md); the CPU venv of the project does not need it.

    python benchmarks/aot.py --config=configs/var_d16.py --topology v5p:2x2x1 --batch_per_chip 64
    python benchmarks/aot.py --config=configs/var_d30.py --topology v5p:2x2x4 --fsdp 16 --programs transformer

Programs (--programs): 'transformer' (the transformer train step of var_jax.trainers.transformer: on token
maps with --config.data.pretokenize=True, else tokenizing the images in the step), 'tokenizer' (the tokenizer
train step, reconstruction + VQ loss) on every chip of the topology,
'sampler' (var_jax.sampling's compiled scale loop: cfg on, the config's top-k / top-p) and 'decode' (the
sampler's f_hat -> pixels, its own program) on one chip. One table row per program:

- compile s: trace + lower + compile on this host. arg / temp / out GiB: per chip, from XLA's memory
  analysis; fits: arguments + temporaries + outputs (minus donated aliases) <= the chip's HBM.
- TFLOP/chip and est. s: XLA's cost analysis ('flops', 'optimal_seconds'). XLA counts the body of a
  while loop once, so for scanned blocks (var.scan) (depth - 1) x one block's cost is added, taken from the
  blocks alone compiled unrolled at depth 2 minus depth 1; and for the passes of the sampler's top-k /
  top-p threshold searches, the token filters compiled with the passes written out minus the same as loops.
  With transformer.grad_accum k (--grad_accum) the micro-batch loop is counted k times (the optimizer update,
  a small part, with it).
- img/s = batch / est. s (all chips); MFU = analytic model FLOPs (benchmarks/common.analytic_flops) per
  chip / est. s / the chip's peak bf16 FLOP/s.
- --top_ops N: under each row the N instructions with the most cycles in XLA's per-instruction estimates
  (relative weights within a program; Pallas kernels have none): where to look for the time.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for the TPU topology, run nothing
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')  # not on a TPU VM: no metadata server to ask
os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')  # quiets libtpu's start-up checks; not the target
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # several compiles may run side by side

import dataclasses  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from var_jax import draws, sampling, sharding  # noqa: E402
from var_jax.models import attention, platform  # noqa: E402
from var_jax.models.stacking import REMAT_POLICIES  # noqa: E402

import common  # noqa: E402

common.define_config_flag()
flags.DEFINE_string('topology', 'v5p:2x2x1', 'TPU topology, e.g. v4:2x2x1, v5e:2x2, v5p:2x2x4, v6e:2x2, v5p:1x1x1')
flags.DEFINE_list('programs', ['transformer', 'tokenizer', 'sampler', 'decode'], 'programs to compile')
flags.DEFINE_integer('batch_per_chip', None, "train batch per chip (default: the config's batch / chips)")
flags.DEFINE_integer('sample_batch', 64, 'sampler batch (one chip; doubled inside for cfg)')
flags.DEFINE_integer('fsdp', None, 'chips per FSDP group (default: config.mesh.fsdp, capped at the chips)')
flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], "transformer compute dtype (default: the config's)")
flags.DEFINE_enum('remat', None, list(REMAT_POLICIES), "per-block rematerialisation (default: the config's)")
flags.DEFINE_enum('attention', None, list(attention.IMPLEMENTATIONS), "attention kernel (default: the config's)")
flags.DEFINE_bool('scan', None, "scan over the blocks (default: the config's)")
flags.DEFINE_integer('grad_accum', None, "transformer micro-batches per step (default: the config's)")
flags.DEFINE_enum('precision', None, ['official', 'lean'], "var.precision (default: the config's)")
flags.DEFINE_bool('correct_loops', True, "correct XLA's once-per-loop cost counts (extra small compiles)")
flags.DEFINE_integer('top_ops', 0, 'after each row, the N instructions XLA estimates costliest (0: none)')
FLAGS = flags.FLAGS

# Per chip: bf16 peak TFLOP/s, HBM GiB, TensorCores (a v4 topology lists each core as a device).
CHIPS = {
    'TPU v4': (275.0, 32.0, 2),
    'TPU v5 lite': (197.0, 16.0, 1),
    'TPU v5': (459.0, 95.0, 2),
    'TPU v6 lite': (918.0, 32.0, 1),
}


@dataclasses.dataclass
class Row:
    program: str
    chips: int
    batch: int  # global batch (sampler: images)
    compile_s: float
    arg: float
    temp: float
    out: float
    fits: bool
    tflop: float  # per chip
    est_s: float
    model_flops: float  # analytic, per chip

    def cells(self, peak):
        # XLA gives a negative estimate for some programs (the tokenizer step, the transformer step on a mesh with
        # both a data and an FSDP axis > 1): none then
        ok = self.est_s > 0
        mfu = self.model_flops / self.est_s / (peak * 1e12) * 100 if self.model_flops and ok else float('nan')
        return [
            self.program,
            str(self.chips),
            str(self.batch),
            f'{self.compile_s:.0f}',
            f'{self.arg:.2f}',
            f'{self.temp:.2f}',
            f'{self.out:.2f}',
            'yes' if self.fits else 'NO',
            f'{self.tflop:.1f}',
            f'{self.est_s:.3f}' if ok else '-',
            f'{self.batch / self.est_s:.0f}' if ok else '-',
            f'{mfu:.0f}%' if mfu == mfu else '-',
        ]


HEADER = [
    'program',
    'chips',
    'batch',
    'compile s',
    'arg GiB',
    'temp GiB',
    'out GiB',
    'fits HBM',
    'TFLOP/chip',
    'est. s',
    'est. img/s',
    'MFU',
]


def device_info(device):
    peak, hbm, cores = CHIPS.get(device.device_kind, (float('nan'), float('nan'), 1))
    share = getattr(device, 'num_cores', cores) / cores  # the part of a chip one device is
    return peak * share, hbm * share


def cost(compiled):
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return float(c.get('flops', 0.0)), float(c.get('optimal_seconds', float('nan')))


def memory(compiled, hbm):
    m = compiled.memory_analysis()
    g = lambda b: b / 2**30
    arg, temp, out, alias = (
        g(m.argument_size_in_bytes),
        g(m.temp_size_in_bytes),
        g(m.output_size_in_bytes),
        g(m.alias_size_in_bytes),
    )
    return arg, temp, out, arg + temp + out - alias <= hbm


def build(config, name, mesh, device, batch, var_overrides=None):
    """(jitted fn, abstract args) of program `name` for config (with var fields overridden)."""
    if var_overrides:
        config = config.copy_and_resolve_references()
        config.var.update(var_overrides)
    vqvae, var = common.models(config)
    if name == 'transformer':
        fn, args, _ = common.transformer_program(config, vqvae, var, mesh, batch)
    elif name == 'tokenizer':
        fn, args, _ = common.tokenizer_program(config, vqvae, mesh, batch)
    elif name == 'sampler':
        fn, args = common.sampler_program(config, vqvae, var, device, batch)
    else:
        fn, args = common.decode_program(vqvae, device, batch)
    return fn, args, var


def compile_program(config, name, mesh, device, batch, var_overrides=None):
    fn, args, var = build(config, name, mesh, device, batch, var_overrides)
    t = time.perf_counter()
    with jax.set_mesh(mesh):  # splash attention runs per device under the mesh (models/attention.py)
        compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t, var


def corrected_cost(config, name, mesh, device, batch, compiled):
    """XLA's (flops, seconds) of the program with every loop iteration counted (see the docstring).

    The scanned blocks: (depth - 1) x the difference between the blocks alone at depth 2 and at depth 1
    (unrolled), as the program runs them. The sampler's threshold searches: the token filters of every
    scale with every pass of each search written out, minus the same filters with the loops. These parts
    compile with the program's own XLA options (the sampler's: `sampling.TPU_COMPILER_OPTIONS`).
    """
    options = sampling.compiler_options('tpu') if name == 'sampler' else None
    f, s = cost(compiled)
    if not s > 0:  # XLA gave no usable estimate (negative for some sharded programs): nothing to correct
        s = float('nan')
    vqvae, var = common.models(config)
    accum = config.transformer.grad_accum if name == 'transformer' else 1
    if var.scan is not False and var.depth > 1:  # None scans on TPU
        (f1, s1), (f2, s2) = (
            cost(_compile(*_blocks_only(config, name, mesh, device, batch // accum, d), mesh, options)) for d in (1, 2)
        )
        f, s = f + (var.depth - 1) * (f2 - f1), s + (var.depth - 1) * (s2 - s1)
    if accum > 1:  # the micro-batch scan's body is counted once: count it k times (and the small update with it)
        f, s = accum * f, accum * s
    sample = config.sample
    if name == 'sampler' and (sample.top_k > 0 or sample.top_p > 0):
        (f_loop, s_loop), (f_all, s_all) = (
            _filters_cost(var, device, batch, sample, unroll, options) for unroll in (1, 32)
        )
        f, s = f + f_all - f_loop, s + s_all - s_loop
    return f, s


def _compile(fn, args, mesh, options=None):
    with jax.set_mesh(mesh):
        return fn.lower(*args).compile(compiler_options=options)


def _blocks_only(config, name, mesh, device, batch, depth):
    """The VAR alone at `depth` (unrolled): training's forward + backward, or the sampler's cached steps
    over every scale on the cfg-doubled batch."""
    c = config.copy_and_resolve_references()
    c.var.update(dict(depth=depth, scan=False))
    _, var = common.models(c)
    shapes = jax.eval_shape(common.var_init_fn(var), jax.random.PRNGKey(0))
    L = common.seq_len(var)
    if name == 'transformer':
        params = common.with_shardings(shapes, sharding.param_sharding(mesh, shapes))
        bs = sharding.batch_sharding(mesh)
        x = jax.ShapeDtypeStruct((batch, L - var.patch_nums[0] ** 2, var.cvae), jnp.float32, sharding=bs)
        labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bs)
        loss = lambda p, labels, x: var.apply(
            {'params': p}, labels, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)}
        ).mean()
        return jax.jit(jax.grad(loss)), (params, labels, x)
    one = jax.sharding.SingleDeviceSharding(device)
    params = common.with_shardings(shapes, jax.tree.map(lambda _: one, shapes))
    labels = jax.ShapeDtypeStruct((2 * batch,), jnp.int32, sharding=one)

    def steps(p, labels):
        v = var.bind({'params': p})
        cond = v.cond(labels)
        x, cache, out = v.start_tokens(cond), v.init_cache(2 * batch), []
        for si, pn in enumerate(var.patch_nums):
            logits, cache = v.step(si, x, cond, cache)
            out.append(logits)
            if si + 1 < len(var.patch_nums):
                x = v.scale_tokens(si + 1, jnp.zeros((2 * batch, var.patch_nums[si + 1] ** 2, var.cvae)))
        return out

    return jax.jit(steps), (params, labels)


def _filters_cost(var, device, batch, sample, unroll, options):
    """XLA's (flops, seconds) of the sampler's token draw (the config's top-k / top-p filter, categorical) for
    every scale's logits, with `unroll` passes of each threshold search per loop body."""
    one = jax.sharding.SingleDeviceSharding(device)
    logits = [
        jax.ShapeDtypeStruct((batch, pn * pn, var.vocab_size), jnp.float32, sharding=one) for pn in var.patch_nums
    ]

    def draw(logits):
        key = jax.random.PRNGKey(0)
        return [
            draws.sample_logits(
                key,
                z,
                top_k=int(sample.top_k),
                top_p=jnp.float32(sample.top_p),
                use_top_p=sample.top_p > 0,
                search_unroll=unroll,
            )[0]
            for z in logits
        ]

    return cost(jax.jit(draw).lower(logits).compile(compiler_options=options))


def top_ops(compiled, n: int) -> str:
    """The n instructions of the compiled program with the most `estimated_cycles` (XLA's per-instruction cost
    model in their backend configs): where the time goes. A loop body's instructions count once per iteration."""
    rows, computation = [], ''
    for line in compiled.as_text().splitlines():
        head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
        if head:
            computation = head.group(1)
        cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
        if cycles and line.startswith('  ') and int(cycles.group(1)) < 2**62:  # int64 max: no estimate
            op = re.search(r'op_name="([^"]*)"', line)
            shape = line.split('=', 1)[1].split()[0]
            rows.append((int(cycles.group(1)), computation[:32], shape[:48], op.group(1)[-70:] if op else ''))
    rows.sort(reverse=True)
    return '\n'.join(f'  {c:>12,} {comp:32} {shape:48} {op}' for c, comp, shape, op in rows[:n])


def main(_):
    config = common.config()
    overrides = {
        k: getattr(FLAGS, k)
        for k in ('dtype', 'remat', 'attention', 'scan', 'precision')
        if getattr(FLAGS, k) is not None
    }
    config.var.update(overrides)
    if FLAGS.grad_accum:
        config.transformer.grad_accum = FLAGS.grad_accum
    dims = [int(d) for d in FLAGS.topology.split(':')[-1].split('x')]
    # fewer chips than one host has (e.g. v5p:1x1x1, a single chip): the host bounds are the topology itself
    host = {'chips_per_host_bounds': tuple(dims)} if len(dims) == 3 and dims[0] * dims[1] * dims[2] < 4 else {}
    topo = topologies.get_topology_desc(topology_name=FLAGS.topology, platform='tpu', **host)
    devices = topo.devices
    n = len(devices)
    fsdp = FLAGS.fsdp or min(config.mesh.fsdp, n)
    mesh = sharding.make_mesh(fsdp, devices=devices)
    one = sharding.make_mesh(1, devices=devices[:1])
    peak, hbm = device_info(devices[0])
    vqvae, var = common.models(config)
    print(
        f'{FLAGS.topology}: {n} x {devices[0].device_kind} (peak {peak:.0f} TFLOP/s bf16, {hbm:.0f} GiB HBM '
        f'per device); {config_flags.get_config_filename(FLAGS["config"])}: VAR d{var.depth} '
        f'{common.seq_len(var)} tokens {vqvae.image_size} px, {var.dtype}, scan {var.scan}, remat {var.remat}, '
        f'attention {var.attention} (-> {_resolved(var)}), fsdp {fsdp}, '
        f'{"pre-tokenised data" if config.data.pretokenize else "tokenising in the step"}; jax {jax.__version__}',
        flush=True,
    )
    widths = [max(len(h), 7) for h in HEADER]
    line = lambda cells: print('| ' + ' | '.join(x.rjust(w) for x, w in zip(cells, widths)) + ' |', flush=True)
    line(HEADER)
    print('|' + '|'.join('-' * (w + 2) for w in widths) + '|', flush=True)
    with platform.compile_target('tpu'):
        for name in FLAGS.programs:
            if name in ('sampler', 'decode'):
                mesh_p, chips, batch = one, 1, FLAGS.sample_batch
            else:
                cfg_batch = config.transformer.batch_size if name == 'transformer' else config.tokenizer.batch_size
                mesh_p, chips = mesh, n
                batch = (FLAGS.batch_per_chip or max(cfg_batch // n, 1)) * n
            compiled, secs, var = compile_program(config, name, mesh_p, devices[0], batch)
            f, s = cost(compiled)
            if FLAGS.correct_loops and name in ('transformer', 'sampler'):
                f, s = corrected_cost(config, name, mesh_p, devices[0], batch, compiled)
            model = {
                'transformer': common.analytic_flops(var, batch // chips),
                'sampler': common.analytic_flops(var, 2 * batch, train=False),
            }.get(name, 0.0)
            line(Row(name, chips, batch, secs, *memory(compiled, hbm), f / 1e12, s, model).cells(peak))
            if FLAGS.top_ops:
                print(top_ops(compiled, FLAGS.top_ops), flush=True)


def _resolved(var):
    with platform.compile_target('tpu'):
        return attention.resolve(var.attention, var.dtype)


if __name__ == '__main__':
    app.run(main)
