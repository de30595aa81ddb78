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
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from var_jax import sampling  # noqa: E402
from var_jax.models.var import VAR, var_config_for_depth  # noqa: E402
from var_jax.models.vqvae import VQVAE  # noqa: E402

PRESETS = {
    # Small config that runs on a laptop CPU: 32 px, 8x8 latent.
    'bench': dict(depth=6, width=384, heads=6, patch_nums='1,2,3,4,6,8', vocab=512, cvae=16, vae_ch=32,
                  vae_ch_mult='1,2,2', num_classes=1000, batch=32, cfg=1.5, top_k=100, top_p=0.95),
    # VAR-d16 with the released tokenizer's shapes, 256 px, the README's FID sampling settings.
    'd16': dict(depth=16, width=1024, heads=16, patch_nums='1,2,3,4,5,6,8,10,13,16', vocab=4096, cvae=32,
                vae_ch=160, vae_ch_mult='1,1,2,2,4', num_classes=1000, batch=64, cfg=1.5, top_k=900, top_p=0.96),
}


def _ints(s):
    return tuple(int(x) for x in s.split(','))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', choices=sorted(PRESETS), default='bench',
                   help='base config; the flags below override it')
    for name, typ in (('depth', int), ('width', int), ('heads', int), ('patch_nums', str), ('vocab', int),
                      ('cvae', int), ('vae_ch', int), ('vae_ch_mult', str), ('num_classes', int), ('batch', int)):
        p.add_argument(f'--{name}', type=typ, default=None)
    p.add_argument('--cfg', type=float, default=None)
    p.add_argument('--top_k', type=int, default=None)
    p.add_argument('--top_p', type=float, default=None)
    p.add_argument('--temperature', type=float, default=1.0)
    p.add_argument('--more_smooth', action='store_true')
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                   help='compute dtype of the transformer blocks (params, logits and the VQVAE stay float32)')
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--flops', action='store_true', help="report XLA's FLOP count (compiles once more)")
    p.add_argument('--ckpt', default=None, help='converted checkpoint dir (var_jax.convert.save_pretrained)')
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def build(args):
    """(vqvae, vae_params, var, var_params): from --ckpt or freshly initialised."""
    dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
    if args.ckpt:
        from var_jax.convert import load_pretrained
        cfg, params = load_pretrained(args.ckpt)
        return VQVAE(**cfg['vae']), params['vae'], VAR(**dict(cfg['var'], dtype=dtype)), params['var']
    pns = _ints(args.patch_nums)
    vqvae = VQVAE(vocab_size=args.vocab, z_channels=args.cvae, ch=args.vae_ch, ch_mult=_ints(args.vae_ch_mult),
                  patch_nums=pns)
    var = VAR(**var_config_for_depth(args.depth, embed_dim=args.width, num_heads=args.heads, vocab_size=args.vocab,
                                     cvae=args.cvae, num_classes=args.num_classes, patch_nums=pns, dtype=dtype))
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    R = vqvae.image_size
    vae_params = jax.jit(vqvae.init)(k1, jnp.zeros((1, R, R, 3)))['params']
    L = sum(p * p for p in pns)
    var_params = jax.jit(var.init)(k2, jnp.zeros((1,), jnp.int32), jnp.zeros((1, L - pns[0] ** 2, args.cvae)))['params']
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
