"""Transformer train-step speed: tokenizing the batch, forward, backward and AdamW in one jitted step.

Random-init models and random images (speed does not depend on the weights). Prints a table:
compile time, steady-state step time (median of --iters steps), img/s, tokens/s, model FLOPs
utilisation (analytic 6 * N_token_params * tokens + attention, against --peak_tflops, or the
device's known peak), XLA's own FLOP count of the step and peak memory.

    python benchmarks/train.py                            # the small CPU bench config, batch 32
    python benchmarks/train.py --preset d16 --dtype bfloat16 --peak_tflops 989   # VAR-d16, 256 px
"""
import resource
import statistics
import time

import common
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from var_jax import sharding, train


def parse_args(argv=None):
    p = common.model_parser(__doc__)
    p.add_argument('--fsdp', type=int, default=1)
    p.add_argument('--peak_tflops', type=float, default=None,
                   help='per-device peak for MFU (e.g. 989 for H100/H200 bf16)')
    return common.parse(p, argv)


def analytic_flops(var, batch):
    """6 * (per-token matmul params) * tokens + attention (QK^T and AV, fwd+bwd) per step."""
    C, L, D = var.embed_dim, sum(p * p for p in var.patch_nums), var.depth
    per_token = D * (4 * C * C + 2 * C * round(C * var.mlp_ratio)) + C * var.vocab_size + var.cvae * C
    attn = D * 2 * 2 * L * L * C  # QK^T and AV, multiply-adds counted as 2 flops
    return 3 * (2 * per_token * L + attn) * batch


def main(argv=None):
    a = parse_args(argv)
    pns = common.ints(a.patch_nums)
    vqvae, var = common.build_models(a)
    mesh = sharding.make_mesh(a.fsdp)
    optim = ml_collections.ConfigDict(dict(tblr=1e-4, warmup_steps=100, wp0=0.005, wpe=0.1, wd=0.05,
                                           wd_end=0.05, clip=2.0, beta1=0.9, beta2=0.95))
    tx = train.make_optimizer(optim, 1000, a.batch)
    R = vqvae.image_size
    vae_params = jax.jit(vqvae.init)(jax.random.PRNGKey(0), jnp.zeros((1, R, R, 3)))['params']
    L = sum(p * p for p in pns)
    state, shardings = train._init_state(
        mesh, tx, 0, lambda k: var.init(k, jnp.zeros((1,), jnp.int32), jnp.zeros((1, L - 1, a.cvae)))['params'])
    rng = np.random.default_rng(0)
    batch = sharding.global_batch({'image': rng.uniform(-1, 1, (a.batch, R, R, 3)).astype(np.float32),
                                   'label': rng.integers(0, a.num_classes, a.batch).astype(np.int32)}, mesh)
    weights = jnp.full((L,), 1.0 / L)
    rep, bs = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    step = jax.jit(train.make_var_step(vqvae, var, tx, 0.0),
                   in_shardings=(shardings, rep, {'image': bs, 'label': bs}, rep),
                   out_shardings=(shardings, rep), donate_argnums=0)
    t = time.perf_counter()
    compiled = step.lower(state, vae_params, batch, weights).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
    state, m = compiled(state, vae_params, batch, weights)
    jax.block_until_ready(m)
    times = []
    for _ in range(a.iters):
        t = time.perf_counter()
        state, m = compiled(state, vae_params, batch, weights)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    flops = analytic_flops(var, a.batch)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
    peak_mem = (stats or {}).get('peak_bytes_in_use')
    peak_mem = peak_mem / 2**30 if peak_mem else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    mfu = flops / dt / (a.peak_tflops * 1e12 * jax.device_count()) * 100 if a.peak_tflops else float('nan')
    rows = [('device', f'{jax.device_count()} x {dev.device_kind}'), ('config', f'{a.preset} d{a.depth} w{a.width} '
            f'h{a.heads} L{L} V{a.vocab} Cvae{a.cvae} batch {a.batch} {a.dtype} fsdp {a.fsdp}'),
            ('compile s', f'{compile_s:.1f}'), ('step s (median)', f'{dt:.4f}'),
            ('step s (min)', f'{min(times):.4f}'), ('img/s', f'{a.batch / dt:.1f}'),
            ('tokens/s', f'{a.batch * L / dt:,.0f}'), ('model TFLOP/step', f'{flops / 1e12:.3f}'),
            ('achieved TFLOP/s', f'{flops / dt / 1e12:.3f}'), ('XLA TFLOP/step', f'{xla_flops / 1e12:.3f}'),
            ('MFU %', f'{mfu:.1f}'), ('peak memory GiB', f'{peak_mem:.2f}'), ('final loss', f'{float(m["loss"]):.4f}')]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f'{k:<{w}}  {v}')


if __name__ == '__main__':
    main()
