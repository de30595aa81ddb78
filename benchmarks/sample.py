"""Sampling latency and throughput of var_jax.sampling.sample (KV-cached, CFG, decode included).

Models of `--config` (default configs/bench.py) with random weights (timing does not depend on them),
or a converted checkpoint with --ckpt DIR (python -m var_jax.convert ... --out DIR). The batch and the
settings are the config's `sample` section (batch_size, cfg, top_k, top_p, temperature, more_smooth).
Prints a table: first call (trace + compile + run), steady-state seconds per batch (median of --iters
calls, each blocked until the images are ready), images per second and the share of the CPU cores this
process got during the steady calls (low values: other processes competed for the cores, or the work
did not parallelise). --flops adds XLA's FLOP count of the compiled sampler and the achieved GFLOP/s.

    python benchmarks/sample.py                                                   # bench config, batch 32
    python benchmarks/sample.py --config=configs/var_d16.py --config.sample.batch_size=64   # VAR-d16 (GPU)
"""

import os
import statistics
import time

import jax
from absl import app, flags

from var_jax import api, sampling

import common

common.define_config_flag()
flags.DEFINE_integer('iters', 10, 'timed batches (after the first call)')
flags.DEFINE_bool('flops', False, "also report XLA's FLOP count of one batch")
flags.DEFINE_string('ckpt', None, 'converted checkpoint dir (python -m var_jax.convert) instead of random weights')
FLAGS = flags.FLAGS


def build(config):
    """(vqvae, vae_params, var, var_params): from --ckpt or freshly initialised."""
    if FLAGS.ckpt:
        vqvae, vae_params, var, var_params = api.load_pretrained(FLAGS.ckpt)
        return vqvae, vae_params, var.clone(dtype=config.var.dtype), var_params
    vqvae, var = common.models(config)
    vae_params, var_params = api.init_params(vqvae, var, jax.random.PRNGKey(0))
    return vqvae, vae_params, var, var_params


def main(_):
    config = common.config()
    s = config.sample
    batch = s.batch_size
    vqvae, vae_params, var, var_params = build(config)
    n_params = sum(x.size for x in jax.tree.leaves(var_params))
    settings = dict(cfg=s.cfg, top_k=s.top_k, top_p=s.top_p, temperature=s.temperature, more_smooth=s.more_smooth)

    def run(i):
        labels = jax.random.randint(jax.random.PRNGKey(1000 + i), (batch,), 0, var.num_classes)
        out = sampling.sample(vqvae, vae_params, var, var_params, labels, jax.random.PRNGKey(i), **settings)
        return jax.block_until_ready(out['images'])

    t0 = time.perf_counter()
    run(0)
    first = time.perf_counter() - t0
    times = []
    cpu0 = os.times()
    for i in range(1, FLAGS.iters + 1):
        t0 = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - t0)
    cpu1 = os.times()
    steady = statistics.median(times)
    cpu_share = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / sum(times) / (os.cpu_count() or 1)
    gflop = None
    if FLAGS.flops:
        gflop = 0.0
        for fn, args in (
            common.sampler_program(config, vqvae, var, jax.devices()[0], batch),
            common.decode_program(vqvae, jax.devices()[0], batch),
        ):
            cost = fn.lower(*args).compile().cost_analysis()
            gflop += (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'] / 1e9

    R = vqvae.image_size
    print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}')
    print(
        f'VAR depth {var.depth} width {var.embed_dim} heads {var.num_heads} ({n_params / 1e6:.1f}M params, '
        f'{var.dtype}), patch_nums {tuple(var.patch_nums)}, vocab {var.vocab_size}, Cvae {var.cvae}; '
        f'VQVAE ch {vqvae.ch} ch_mult {tuple(vqvae.ch_mult)}, {R}x{R} px'
    )
    print(f'batch {batch}, ' + ', '.join(f'{k} {v}' for k, v in settings.items()) + f', iters {FLAGS.iters}')
    print()
    cols = [
        ('first call (s, incl. compile)', f'{first:.3f}'),
        ('steady s/batch (median)', f'{steady:.4f}'),
        ('min s/batch', f'{min(times):.4f}'),
        ('images/s', f'{batch / steady:.1f}'),
        ('CPU share', f'{100 * cpu_share:.0f}%'),
    ]
    if gflop is not None:
        # XLA counts a loop body once: with scanned blocks this is one block per scale, not depth.
        cols += [('GFLOP/batch (XLA, loops once)', f'{gflop:.1f}'), ('GFLOP/s', f'{gflop / steady:.1f}')]
    print('| ' + ' | '.join(h for h, _ in cols) + ' |')
    print('|' + '|'.join('-' * (len(h) + 2) for h, _ in cols) + '|')
    print('| ' + ' | '.join(v.rjust(len(h)) for h, v in cols) + ' |')


if __name__ == '__main__':
    app.run(main)
