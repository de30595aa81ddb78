"""Official VAR checkpoints (PyTorch state dicts) -> var_jax params.

The architecture is read off the keys and shapes (depth, width, vocabulary, Cvae, l2-norm
attention, shared AdaLN, the VAE's ch and ch_mult); only patch_nums, which no tensor fixes
uniquely, is an argument. Every key is checked: one error lists all missing, unexpected and
mis-shaped entries. Official buffers (lvl_1L, the attention mask, zero_k_bias,
ema_vocab_hit_SV) are validated where possible and dropped.

torch is imported only to read .pth files:

    python -m var_jax.convert --vae vae_ch160v4096z32.pth --var var_d16.pth --out DIR
"""

import argparse
import os
import re
import sys
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from var_jax import checkpoint
from var_jax.errors import MissingFileError, UserError
from var_jax.fileio import atomic_write
from var_jax.models import inception, lpips
from var_jax.models.quantizer import validate_patch_nums
from var_jax.models.stacking import BLOCKS, stack_blocks, unstack_blocks
from var_jax.models.var import PATCH_NUMS_256, PATCH_NUMS_512, VAR, block_causal_mask, level_ids, var_config_for_depth
from var_jax.models.vqvae import VQVAE

# Official module paths -> ours (applied in order; remaining dots become path separators).
_RENAMES = (
    (r'^(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn)\.(\d+)\.', r'\1.\2_\3_\4_\5.'),
    (r'^(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.', r'\1.\2_\3_\4.'),
    (r'^(encoder|decoder)\.mid\.', r'\1.mid_'),
    (r'^quantize\.quant_resi\.qresi_ls\.(\d+)\.', r'quantize.phis_\1.conv.'),
    (r'^quantize\.quant_resi\.qresi\.', r'quantize.phis_0.conv.'),
    (r'^quantize\.quant_resi\.(\d+)\.', r'quantize.phis_\1.conv.'),
    (r'^blocks\.(\d+)\.', r'blocks_\1.'),
    (r'ada_lin\.1\.', r'ada_lin.'),
    (r'\.scale_mul_1H11$', r'.scale_mul'),
)
_VAR_BUFFERS = re.compile(r'^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$')
_VAE_BUFFERS = re.compile(r'^quantize\.ema_vocab_hit_SV$')


class CheckpointMismatchError(UserError):
    """A state dict that does not fit the model it describes."""


def load_torch_state_dict(path: str) -> dict:
    """Reads an official .pth (a flat state dict, or a train.py checkpoint) into NumPy arrays."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            'reading .pth checkpoints needs PyTorch: pip install torch '
            '(CPU is enough), or pass a mapping of key -> array instead'
        ) from e
    if not os.path.isfile(path):
        raise MissingFileError(f'{path} not found: give the path of an official .pth file')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f'{path} is not a readable PyTorch checkpoint ({reason}); give an official .pth file '
            f'(a truncated download: fetch it again)'
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get('trainer'), dict):  # train.py checkpoint: {'trainer': {...}}
        trainer = obj['trainer']
        obj = trainer.get('var_wo_ddp', trainer.get('vae_local'))
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise UserError(
            f'{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors); '
            f'give an official .pth file such as vae_ch160v4096z32.pth or var_d16.pth'
        )
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}


def _our_path(key: str) -> str:
    for pat, rep in _RENAMES:
        key = re.sub(pat, rep, key)
    return key.replace('.', '/')


def _convert_leaf(value: np.ndarray, leaf: str, shape: tuple) -> Optional[np.ndarray]:
    """Torch layout -> ours: conv OIHW -> HWIO, linear (out, in) -> (in, out), squeeze singletons."""
    if leaf == 'kernel' and value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    elif leaf == 'kernel' and value.ndim == 2:
        value = value.T
    if value.shape != shape and tuple(d for d in value.shape if d != 1) == tuple(d for d in shape if d != 1):
        value = value.reshape(shape)
    return value if value.shape == shape else None


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], abstract_params, buffers: re.Pattern) -> dict:
    """Maps every official key onto `abstract_params` (a pytree of shapes); raises one report.

    VAR's stacked blocks ({'blocks': (depth, ...)}) are matched per block (blocks_<i>, as the official
    blocks.<i>) and stacked at the end.
    """
    stacked = BLOCKS in abstract_params
    if stacked:
        abstract_params = unstack_blocks(
            jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype), abstract_params)
        )
    expected = {'/'.join(k): v.shape for k, v in traverse_util.flatten_dict(abstract_params).items()}
    out, unexpected, misshaped = {}, [], []
    for key, value in state_dict.items():
        if buffers.match(key):
            continue
        path = _our_path(key)
        module, _, leaf = path.rpartition('/')
        # torch 'weight' is our kernel (conv, linear), scale (norm), embedding (table) or a raw param.
        candidates = [path] + (
            [f'{module}/{n}' for n in ('kernel', 'scale', 'embedding')] + [module] if leaf == 'weight' else []
        )
        target = next((c for c in candidates if c in expected), None)
        if target is None:
            unexpected.append(f'{key} {tuple(np.shape(value))}')
            continue
        converted = _convert_leaf(np.asarray(value), target.rpartition('/')[2], tuple(expected[target]))
        if converted is None:
            misshaped.append(
                f'{key}: checkpoint {tuple(np.shape(value))}, model expects {tuple(expected[target])} (as {target})'
            )
            out[target] = None  # reported as mis-shaped, not also as missing
            continue
        out[target] = converted.astype(np.float32, copy=False)
    missing = sorted(set(expected) - set(out))  # in var_jax names (module/param)
    if missing or unexpected or misshaped:
        lines = ['the checkpoint does not fit the model (missing entries in var_jax names):']
        for title, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)):
            if items:
                lines.append(f'  {len(items)} {title}: ' + '; '.join(items[:50]) + (' ...' if len(items) > 50 else ''))
        lines.append(
            'check that the file is an official VAR/VQVAE state dict and that patch_nums '
            '(--patch_nums) matches the model (256 px: 1..16, 512 px: 1..32)'
        )
        raise CheckpointMismatchError('\n'.join(lines))
    params = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in out.items()})
    return stack_blocks(params) if stacked else params


def _count_indices(state_dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _require(state_dict, *keys):
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise CheckpointMismatchError(f'not an official state dict of this kind: missing {missing}')


def infer_vae_config(state_dict, patch_nums: Sequence[int] = PATCH_NUMS_256, quant_resi: float = 0.5) -> dict:
    """VQVAE constructor arguments from the keys and shapes of an official VQVAE state dict."""
    _require(state_dict, 'encoder.conv_in.weight', 'encoder.conv_out.weight', 'quantize.embedding.weight')
    ch = state_dict['encoder.conv_in.weight'].shape[0]
    levels = _count_indices(state_dict, r'^encoder\.down\.(\d+)\.')
    ch_mult = tuple(state_dict[f'encoder.down.{i}.block.0.conv1.weight'].shape[0] // ch for i in range(levels))
    if any(k.startswith('quantize.quant_resi.qresi_ls.') for k in state_dict):
        share, resi = _count_indices(state_dict, r'^quantize\.quant_resi\.qresi_ls\.(\d+)\.'), quant_resi
    elif any(k.startswith('quantize.quant_resi.qresi.') for k in state_dict):
        share, resi = 1, quant_resi
    elif any(re.match(r'^quantize\.quant_resi\.\d+\.', k) for k in state_dict):
        share, resi = 0, quant_resi
    else:
        share, resi = 4, 0.0  # no phi convs at all: identity phi
    return dict(
        vocab_size=int(state_dict['quantize.embedding.weight'].shape[0]),
        z_channels=int(state_dict['encoder.conv_out.weight'].shape[0]),
        ch=int(ch),
        ch_mult=ch_mult,
        num_res_blocks=_count_indices(state_dict, r'^encoder\.down\.0\.block\.(\d+)\.'),
        patch_nums=validate_patch_nums(patch_nums),
        quant_resi=resi,
        share_quant_resi=share,
        quant_conv_ks=int(state_dict['quant_conv.weight'].shape[-1]) if 'quant_conv.weight' in state_dict else 3,
        using_sa=f'encoder.down.{levels - 1}.attn.0.qkv.weight' in state_dict,
        using_mid_sa='encoder.mid.attn_1.qkv.weight' in state_dict,
    )


def infer_var_config(state_dict, patch_nums: Sequence[int] = PATCH_NUMS_256, num_heads: Optional[int] = None) -> dict:
    """VAR constructor arguments from the keys and shapes of an official VAR state dict.

    The head count is read off scale_mul_1H11 (l2-norm attention, every official model). Without it no
    tensor fixes the head count, so `num_heads` must be given: guessing would give wrong logits.
    """
    _require(state_dict, 'word_embed.weight', 'class_emb.weight', 'head.weight', 'blocks.0.ffn.fc1.weight')
    C, cvae = state_dict['word_embed.weight'].shape
    l2 = 'blocks.0.attn.scale_mul_1H11' in state_dict
    if l2:
        heads = int(state_dict['blocks.0.attn.scale_mul_1H11'].shape[1])
        if num_heads is not None and num_heads != heads:
            raise CheckpointMismatchError(
                f"num_heads={num_heads} but the checkpoint's scale_mul_1H11 has {heads} heads; drop --num_heads"
            )
    elif num_heads is None:
        raise CheckpointMismatchError(
            'this VAR has attention without l2 norm (no blocks.*.attn.scale_mul_1H11), so its head count cannot '
            'be read off the tensors; pass num_heads (--num_heads; the official family uses num_heads = depth)'
        )
    else:
        heads = num_heads
    depth = _count_indices(state_dict, r'^blocks\.(\d+)\.')
    return dict(
        vocab_size=int(state_dict['head.weight'].shape[0]),
        cvae=int(cvae),
        num_classes=int(state_dict['class_emb.weight'].shape[0]) - 1,
        depth=depth,
        embed_dim=int(C),
        num_heads=int(heads),
        mlp_ratio=state_dict['blocks.0.ffn.fc1.weight'].shape[0] / C,
        shared_aln='shared_ada_lin.1.weight' in state_dict,
        attn_l2_norm=l2,
        drop_path_rate=var_config_for_depth(depth)['drop_path_rate'],
        patch_nums=validate_patch_nums(patch_nums),
    )


def _abstract_params(model, *args):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))['params']


def abstract_vae_params(cfg: dict):
    model = VQVAE(**cfg)
    return _abstract_params(model, jnp.zeros((1, model.image_size, model.image_size, 3)))


def abstract_var_params(cfg: dict):
    model = VAR(**cfg)
    L = sum(p * p for p in model.patch_nums)
    return _abstract_params(model, jnp.zeros((1,), jnp.int32), jnp.zeros((1, L - model.patch_nums[0] ** 2, model.cvae)))


def convert_vae(state_dict, patch_nums: Sequence[int] = PATCH_NUMS_256, quant_resi: float = 0.5):
    """Official VQVAE state dict -> (VQVAE kwargs, params)."""
    cfg = infer_vae_config(state_dict, patch_nums, quant_resi)
    params = state_dict_to_params(state_dict, abstract_vae_params(cfg), _VAE_BUFFERS)
    return cfg, params


def convert_var(state_dict, patch_nums: Sequence[int] = PATCH_NUMS_256, num_heads: Optional[int] = None):
    """Official VAR state dict -> (VAR kwargs, params); validates and drops the buffers."""
    cfg = infer_var_config(state_dict, patch_nums, num_heads)
    L = sum(p * p for p in cfg['patch_nums'])
    if cfg['embed_dim'] % cfg['num_heads']:
        raise CheckpointMismatchError(
            f'width {cfg["embed_dim"]} is not divisible by {cfg["num_heads"]} heads; pass num_heads'
        )
    if 'pos_1LC' in state_dict and state_dict['pos_1LC'].shape[1] != L:
        raise CheckpointMismatchError(
            f'the checkpoint has {state_dict["pos_1LC"].shape[1]} tokens but patch_nums {cfg["patch_nums"]} '
            f'give {L}; pass the patch_nums it was trained with (256 px: {PATCH_NUMS_256}, 512 px: {PATCH_NUMS_512})'
        )
    if 'lvl_1L' in state_dict and not np.array_equal(
        np.asarray(state_dict['lvl_1L']).reshape(-1), level_ids(cfg['patch_nums'])
    ):
        raise CheckpointMismatchError('buffer lvl_1L does not match patch_nums; pass the right --patch_nums')
    if 'attn_bias_for_masking' in state_dict:
        visible = np.asarray(state_dict['attn_bias_for_masking']).reshape(L, L) == 0
        if not np.array_equal(visible, block_causal_mask(cfg['patch_nums'])):
            raise CheckpointMismatchError('buffer attn_bias_for_masking is not the block-causal mask of patch_nums')
    for k, v in state_dict.items():
        if k.endswith('zero_k_bias') and np.any(np.asarray(v) != 0):
            raise CheckpointMismatchError(f'buffer {k} must be all zeros (keys have no bias)')
    params = state_dict_to_params(state_dict, abstract_var_params(cfg), _VAR_BUFFERS)
    return cfg, params


def default_patch_nums(var_state_dict=None) -> tuple:
    """The official scale schedule a VAR state dict was trained with: the 512-px one for its 2240 tokens
    (VAR-d36), else (or without a VAR) the 256-px one."""
    pos = None if var_state_dict is None else var_state_dict.get('pos_1LC')
    if pos is not None and pos.shape[1] == sum(p * p for p in PATCH_NUMS_512):
        return PATCH_NUMS_512
    return PATCH_NUMS_256


# --- LPIPS-VGG (the tokenizer's perceptual loss) ----------------------------------------------
def convert_files(
    vae_path: str,
    var_path: Optional[str] = None,
    patch_nums: Optional[Sequence[int]] = None,
    num_heads: Optional[int] = None,
):
    """Official .pth files -> ({'vae': kwargs[, 'var': kwargs]}, {'vae': params[, 'var': params]}), what
    `checkpoint.save_pretrained` writes; patch_nums defaults to the VAR's schedule (`default_patch_nums`)."""
    var_sd = load_torch_state_dict(var_path) if var_path else None
    pns = tuple(patch_nums) if patch_nums else default_patch_nums(var_sd)
    vae_cfg, vae_params = convert_vae(load_torch_state_dict(vae_path), pns)
    cfgs, params = {'vae': vae_cfg}, {'vae': vae_params}
    if var_sd is not None:
        var_cfg, params['var'] = convert_var(var_sd, pns, num_heads)
        cfgs['var'] = var_cfg
        if (var_cfg['vocab_size'], var_cfg['cvae']) != (vae_cfg['vocab_size'], vae_cfg['z_channels']):
            raise CheckpointMismatchError(
                f'the VAR expects vocabulary {var_cfg["vocab_size"]} and Cvae {var_cfg["cvae"]} but the VQVAE has '
                f'{vae_cfg["vocab_size"]} and {vae_cfg["z_channels"]}: use the tokenizer it was trained with'
            )
    return cfgs, params


def _read_lpips_pth(path: str) -> dict:
    try:
        return load_torch_state_dict(path)
    except ImportError:
        raise
    except Exception as e:  # torch.load's errors: truncated file, not a state dict, ...
        raise lpips.LPIPSWeightsError(
            f'{path} is not a readable PyTorch state dict ({type(e).__name__}: {e}). {lpips.WHERE_TO_GET}'
        ) from e


def convert_lpips(vgg16_path: str, lin_path: str, out_path: str) -> None:
    """Checks the two LPIPS-VGG .pth files and writes their tensors (torch keys and layouts) to one .npz,
    the file `tokenizer.perceptual_weights_path` takes."""
    missing = [p for p in (vgg16_path, lin_path) if not os.path.isfile(p)]
    if missing:
        raise MissingFileError(f'{" and ".join(missing)} not found. {lpips.WHERE_TO_GET}')
    vgg, lin = _read_lpips_pth(vgg16_path), _read_lpips_pth(lin_path)
    lpips.check_tensors(vgg, lpips.vgg16_torch_shapes(), vgg16_path)
    lpips.check_tensors(lin, lpips.lin_torch_shapes(), lin_path)
    tensors = {k: vgg[k] for k in lpips.vgg16_torch_shapes()} | {k: lin[k] for k in lpips.lin_torch_shapes()}
    with atomic_write(out_path) as tmp:
        np.savez(tmp, **tensors)


# --- the FID Inception (evaluation) ------------------------------------------------------------
_INCEPTION_BUFFERS = re.compile(r'.*\.num_batches_tracked$')


def convert_inception(state_dict) -> dict:
    """pytorch-fid's FID Inception state dict (pt_inception-2015-12-05-6726825d.pth) -> InceptionV3 params.

    torch names map one to one (bn.weight -> bn/scale, fc.weight -> fc/kernel); conv OIHW -> HWIO.
    """
    try:
        return state_dict_to_params(state_dict, inception.abstract_params(), _INCEPTION_BUFFERS)
    except CheckpointMismatchError as e:  # replace the VAR-specific hint of the report
        report = str(e).rsplit('\n', 1)[0]
        raise CheckpointMismatchError(f'{report}\nnot the FID Inception. {inception.WHERE_TO_GET}') from None


def save_inception(pth_path: str, out_path: str) -> None:
    """Converts the FID Inception .pth once to the .npz that `config.eval.inception_path` takes."""
    if not os.path.isfile(pth_path):
        raise MissingFileError(f'{pth_path} not found. {inception.WHERE_TO_GET}')
    if not out_path.endswith('.npz'):
        raise UserError(f'--out {out_path}: the converted Inception is one .npz file; name it *.npz')
    params = convert_inception(load_torch_state_dict(pth_path))
    with atomic_write(out_path) as tmp:
        np.savez(tmp, **inception.flatten_params(params))


# --- the command line ---------------------------------------------------------------------------
def main(argv=None):
    """The command line; an error a user can fix ends in one line on stderr and exit code 2, as in main.py."""
    try:
        _main(argv)
    except (UserError, ImportError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)


def _main(argv):
    p = argparse.ArgumentParser(
        description='Convert official PyTorch weights (.pth) to var_jax files: VQVAE (+ VAR) to a params '
        'directory (--vae [--var] --out DIR), or the LPIPS-VGG weights to one .npz '
        '(--lpips_vgg16 --lpips_lin --out FILE.npz).'
    )
    p.add_argument('--vae', help='official VQVAE state dict, e.g. vae_ch160v4096z32.pth')
    p.add_argument('--var', help='official VAR state dict, e.g. var_d16.pth')
    p.add_argument('--out', required=True, help='output directory (orbax params + model.json) or .npz')
    p.add_argument(
        '--patch_nums',
        default=None,
        help='comma-separated scale sides; default: the 256-px schedule (the 512-px one for L=2240)',
    )
    p.add_argument(
        '--num_heads',
        type=int,
        default=None,
        help='heads of a VAR without l2-norm attention (its tensors do not fix the count)',
    )
    p.add_argument('--lpips_vgg16', help=f'torchvision VGG16 state dict, {lpips.VGG16_FILE}')
    p.add_argument('--lpips_lin', help=f"the lpips package's weights/v0.1/{lpips.LIN_FILE}")
    p.add_argument('--inception', help=f'the FID Inception of pytorch-fid, {inception.PTH_FILE} (--out FILE.npz)')
    args = p.parse_args(argv)
    if args.inception:
        if args.vae or args.var or args.lpips_vgg16 or args.lpips_lin:
            p.error('--inception converts the FID Inception on its own: give only --inception and --out FILE.npz')
        save_inception(args.inception, args.out)
        print(f'wrote {args.out}')
        return
    if args.lpips_vgg16 or args.lpips_lin:
        if not (args.lpips_vgg16 and args.lpips_lin) or args.vae or args.var:
            p.error('LPIPS conversion takes both --lpips_vgg16 and --lpips_lin (and no --vae/--var)')
        convert_lpips(args.lpips_vgg16, args.lpips_lin, args.out)
        print(f'wrote {args.out}')
        return
    if not args.vae:
        p.error('give --vae (and optionally --var), or --lpips_vgg16 and --lpips_lin')
    pns = tuple(int(x) for x in args.patch_nums.split(',')) if args.patch_nums else None
    cfgs, params = convert_files(args.vae, args.var, pns, args.num_heads)
    checkpoint.save_pretrained(args.out, cfgs, params)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f'wrote {args.out}: {n:,} parameters; ' + '; '.join(f'{k.upper()} {v}' for k, v in cfgs.items()))


if __name__ == '__main__':
    main()
