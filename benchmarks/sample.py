"""Sampling latency and throughput of var_jax.sampling.sample (KV-cached, CFG, decode included).

Random-init models by default (timing does not depend on the weights), or a converted
checkpoint with --ckpt DIR (python -m var_jax.convert ... --out DIR). Prints a table: first
call (trace + compile + run), steady-state seconds per batch (median of --iters calls, each
blocked until the images are ready), images per second and the share of the CPU cores this
process got during the steady calls (low values: other processes competed for the cores, or
the work did not parallelise).
--flops adds XLA's FLOP count of the compiled sampler and the achieved GFLOP/s.

    python benchmarks/sample.py                      # the small CPU bench config
    python benchmarks/sample.py --preset d16         # VAR-d16 at 256 px, batch 64 (GPU)
"""
import os
import statistics
import time

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import jax.numpy as jnp

from var_jax import api, sampling


def parse_args(argv=None):
    p = common.model_parser(__doc__)
    p.add_argument('--cfg', type=float, default=1.5)
    p.add_argument('--top_k', type=int, default=100)
    p.add_argument('--top_p', type=float, default=0.95)
    p.add_argument('--temperature', type=float, default=1.0)
    p.add_argument('--more_smooth', action='store_true')
    p.add_argument('--flops', action='store_true', help="also report XLA's FLOP count of one batch")
    p.add_argument('--ckpt', default=None, help='converted checkpoint dir (var_jax.convert.save_pretrained)')
    return common.parse(p, argv)


def build(args):
    """(vqvae, vae_params, var, var_params): from --ckpt or freshly initialised."""
    if args.ckpt:
        vqvae, vae_params, var, var_params = api.load_pretrained(args.ckpt)
        return vqvae, vae_params, var.clone(dtype=args.dtype), var_params
    vqvae, var = common.build_models(args)
    vae_params, var_params = api.init_params(vqvae, var, jax.random.PRNGKey(0))
    return vqvae, vae_params, var, var_params


def main(argv=None):
    args = parse_args(argv)
    vqvae, vae_params, var, var_params = build(args)
    n_params = sum(x.size for x in jax.tree.leaves(var_params))
    settings = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                    more_smooth=args.more_smooth)

    def run(i):
        labels = jax.random.randint(jax.random.PRNGKey(1000 + i), (args.batch,), 0, var.num_classes)
        out = sampling.sample(vqvae, vae_params, var, var_params, labels, jax.random.PRNGKey(i), **settings)
        return jax.block_until_ready(out['images'])

    t0 = time.perf_counter()
    run(0)
    first = time.perf_counter() - t0
    times = []
    cpu0 = os.times()
    for i in range(1, args.iters + 1):
        t0 = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - t0)
    cpu1 = os.times()
    steady = statistics.median(times)
    cpu_share = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / sum(times) / (os.cpu_count() or 1)
    gflop = None
    if args.flops:
        fn = sampling._compiled_loop(vqvae, var, args.top_k, args.top_p > 0, args.more_smooth, False)
        labels = jnp.zeros((args.batch,), jnp.int32)
        cost = fn.lower(vae_params, var_params, labels, jax.random.PRNGKey(0), jnp.float32(args.cfg),
                        jnp.float32(args.top_p), jnp.float32(args.temperature)).compile().cost_analysis()
        gflop = (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'] / 1e9

    R = vqvae.image_size
    print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}')
    print(f'VAR depth {var.depth} width {var.embed_dim} heads {var.num_heads} ({n_params / 1e6:.1f}M params, '
          f'{args.dtype}), patch_nums {tuple(var.patch_nums)}, vocab {var.vocab_size}, Cvae {var.cvae}; '
          f'VQVAE ch {vqvae.ch} ch_mult {tuple(vqvae.ch_mult)}, {R}x{R} px')
    print(f'batch {args.batch}, ' + ', '.join(f'{k} {v}' for k, v in settings.items()) + f', iters {args.iters}')
    print()
    cols = [('first call (s, incl. compile)', f'{first:.3f}'), ('steady s/batch (median)', f'{steady:.4f}'),
            ('min s/batch', f'{min(times):.4f}'), ('images/s', f'{args.batch / steady:.1f}'),
            ('CPU share', f'{100 * cpu_share:.0f}%')]
    if gflop is not None:
        cols += [('GFLOP/batch', f'{gflop:.1f}'), ('GFLOP/s', f'{gflop / steady:.1f}')]
    print('| ' + ' | '.join(h for h, _ in cols) + ' |')
    print('|' + '|'.join('-' * (len(h) + 2) for h, _ in cols) + '|')
    print('| ' + ' | '.join(v.rjust(len(h)) for h, v in cols) + ' |')


if __name__ == '__main__':
    main()
