"""Model presets and command-line options shared by the benchmarks."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from var_jax import runtime  # noqa: E402

runtime.keep_freed_memory_on_cpu()  # before JAX starts its thread pool (see the docstring)

from var_jax import api  # noqa: E402
from var_jax.models.var import var_config_for_depth  # noqa: E402

PRESETS = {
    # The small bench config that runs on a laptop CPU: 32 px, 8x8 latent.
    'bench': dict(depth=6, width=384, heads=6, patch_nums='1,2,3,4,6,8', vocab=512, cvae=16, vae_ch=32,
                  vae_ch_mult='1,2,2', num_classes=1000, batch=32),
    # VAR-d16 with the released tokenizer's shapes, 256 px.
    'd16': dict(depth=16, width=1024, heads=16, patch_nums='1,2,3,4,5,6,8,10,13,16', vocab=4096, cvae=32,
                vae_ch=160, vae_ch_mult='1,1,2,2,4', num_classes=1000, batch=64),
}


def ints(s: str) -> tuple:
    return tuple(int(x) for x in s.split(','))


def model_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with --preset and the model / batch / dtype options that override it."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', choices=sorted(PRESETS), default='bench', help='base config; the flags below override it')
    for name, typ in (('depth', int), ('width', int), ('heads', int), ('patch_nums', str), ('vocab', int),
                      ('cvae', int), ('vae_ch', int), ('vae_ch_mult', str), ('num_classes', int), ('batch', int)):
        p.add_argument(f'--{name}', type=typ, default=None)
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                   help='compute dtype of the transformer blocks (params, logits and the VQVAE stay float32)')
    p.add_argument('--iters', type=int, default=10)
    return p


def parse(parser: argparse.ArgumentParser, argv=None):
    args = parser.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def build_models(args):
    """(VQVAE, VAR) of the command-line settings."""
    pns = ints(args.patch_nums)
    vae_kw = dict(vocab_size=args.vocab, z_channels=args.cvae, ch=args.vae_ch, ch_mult=ints(args.vae_ch_mult),
                  patch_nums=pns)
    var_kw = var_config_for_depth(args.depth, embed_dim=args.width, num_heads=args.heads,
                                  num_classes=args.num_classes, dtype=args.dtype)
    return api.build_models(vae_kw, var_kw)
