"""Transformer train-step speed: tokenizing the batch, forward, backward and AdamW in one jitted step.

The step is the trainer's own (`var_jax.trainers.transformer.make_step`) on the models and optimizer of
`--config` (default configs/bench.py), random-init weights and random images, or random token maps with
--config.data.pretokenize=True (speed does not depend on them). Prints: compile time, steady-state step time
(median of --iters steps), img/s, tokens/s, model
FLOPs utilisation (analytic 6 * N_token_params * tokens + attention, against --peak_tflops), XLA's own
FLOP count of the step and peak memory.

    python benchmarks/train.py                                                 # bench config, batch 32
    python benchmarks/train.py --config=configs/var_d16.py --config.transformer.batch_size=64 \\
        --peak_tflops 989                                                      # VAR-d16, bf16, one H100/H200
"""

import os
import resource
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from var_jax import sharding
from var_jax.trainers import loop

import common

common.define_config_flag()
flags.DEFINE_integer('iters', 10, 'timed steps (after one warm-up step)')
flags.DEFINE_float('peak_tflops', None, 'per-device peak for MFU (e.g. 989 for H100/H200 bf16)')
FLAGS = flags.FLAGS


def main(_):
    config = common.config()
    vqvae, var = common.models(config)
    batch = config.transformer.batch_size
    mesh = sharding.make_mesh(config.mesh.fsdp)
    step, args, tx = common.transformer_program(config, vqvae, var, mesh, batch)
    t = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t

    # Concrete inputs with the abstract ones' shapes and shardings.
    R = vqvae.image_size
    state, _ = loop.init_state(mesh, tx, config.seed, common.var_init_fn(var))
    vae_params = jax.jit(vqvae.init)(jax.random.PRNGKey(0), np.zeros((1, R, R, 3), np.float32))['params']
    rng = np.random.default_rng(0)
    inputs = (
        {'tokens': rng.integers(0, var.vocab_size, (batch, common.seq_len(var))).astype(np.int32)}
        if config.data.pretokenize
        else {'image': rng.uniform(-1, 1, (batch, R, R, 3)).astype(np.float32)}
    )
    data = sharding.global_batch(inputs | {'label': rng.integers(0, var.num_classes, batch).astype(np.int32)}, mesh)
    w = jax.device_put(
        np.full((common.seq_len(var),), 1.0 / common.seq_len(var), np.float32), sharding.replicated(mesh)
    )
    state, m = compiled(state, vae_params, data, w)
    jax.block_until_ready(m)
    times = []
    cpu0 = os.times()
    for _ in range(FLAGS.iters):
        t = time.perf_counter()
        state, m = compiled(state, vae_params, data, w)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    cpu1 = os.times()
    cpu_step = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / len(times)  # robust to other load

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
    flops = common.analytic_flops(var, batch)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
    peak_mem = (stats or {}).get('peak_bytes_in_use')
    peak_mem = peak_mem / 2**30 if peak_mem else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak = FLAGS.peak_tflops
    mfu = flops / dt / (peak * 1e12 * jax.device_count()) * 100 if peak else float('nan')
    L = common.seq_len(var)
    rows = [
        ('device', f'{jax.device_count()} x {dev.device_kind}'),
        (
            'config',
            f'd{var.depth} w{var.embed_dim} h{var.num_heads} L{L} V{var.vocab_size} Cvae{var.cvae} '
            f'batch {batch} {var.dtype} fsdp {config.mesh.fsdp} scan {var.scan} remat {var.remat} '
            f'attention {var.attention}',
        ),
        ('compile s', f'{compile_s:.1f}'),
        ('step s (median)', f'{dt:.4f}'),
        ('step s (min)', f'{min(times):.4f}'),
        ('CPU s/step', f'{cpu_step:.3f}'),
        ('img/s', f'{batch / dt:.1f}'),
        ('tokens/s', f'{batch * L / dt:,.0f}'),
        ('model TFLOP/step', f'{flops / 1e12:.3f}'),
        ('achieved TFLOP/s', f'{flops / dt / 1e12:.3f}'),
        ('XLA TFLOP/step', f'{xla_flops / 1e12:.3f}'),
        ('MFU %', f'{mfu:.1f}'),
        ('peak memory GiB', f'{peak_mem:.2f}'),
        ('final loss', f'{float(m["loss"]):.4f}'),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f'{k:<{w}}  {v}')


if __name__ == '__main__':
    app.run(main)
