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
import json
import os
import re
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from var_jax.models.quantizer import validate_patch_nums
from var_jax.models.var import VAR, block_causal_mask, level_ids
from var_jax.models.vqvae import VQVAE

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

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


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model it describes."""


def load_torch_state_dict(path: str) -> dict:
    """Reads an official .pth (a flat state dict, or a train.py checkpoint) into NumPy arrays."""
    try:
        import torch
    except ImportError as e:
        raise ImportError('reading .pth checkpoints needs PyTorch: pip install torch '
                          '(CPU is enough), or pass a mapping of key -> array instead') from e
    obj = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(obj, dict) and 'trainer' in obj:  # train.py checkpoint: {'trainer': {...}}
        trainer = obj['trainer']
        obj = trainer.get('var_wo_ddp', trainer.get('vae_local'))
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
    """Maps every official key onto `abstract_params` (a pytree of shapes); raises one report."""
    expected = {'/'.join(k): v.shape for k, v in traverse_util.flatten_dict(abstract_params).items()}
    out, unexpected, misshaped = {}, [], []
    for key, value in state_dict.items():
        if buffers.match(key):
            continue
        path = _our_path(key)
        module, _, leaf = path.rpartition('/')
        # torch 'weight' is our kernel (conv, linear), scale (norm), embedding (table) or a raw param.
        candidates = [path] + ([f'{module}/{n}' for n in ('kernel', 'scale', 'embedding')] + [module]
                               if leaf == 'weight' else [])
        target = next((c for c in candidates if c in expected), None)
        if target is None:
            unexpected.append(f'{key} {tuple(np.shape(value))}')
            continue
        converted = _convert_leaf(np.asarray(value), target.rpartition('/')[2], tuple(expected[target]))
        if converted is None:
            misshaped.append(f'{key}: checkpoint {tuple(np.shape(value))}, model expects '
                             f'{tuple(expected[target])} (as {target})')
            out[target] = None  # reported as mis-shaped, not also as missing
            continue
        out[target] = converted.astype(np.float32, copy=False)
    missing = sorted(set(expected) - set(out))  # in var_jax names (module/param)
    if missing or unexpected or misshaped:
        lines = ['the checkpoint does not fit the model (missing entries in var_jax names):']
        for title, items in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)):
            if items:
                lines.append(f'  {len(items)} {title}: ' + '; '.join(items[:50]) + (' ...' if len(items) > 50 else ''))
        lines.append('check that the file is an official VAR/VQVAE state dict and that patch_nums '
                     '(--patch_nums) matches the model (256 px: 1..16, 512 px: 1..32)')
        raise CheckpointMismatchError('\n'.join(lines))
    return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in out.items()})


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
        ch=int(ch), ch_mult=ch_mult,
        num_res_blocks=_count_indices(state_dict, r'^encoder\.down\.0\.block\.(\d+)\.'),
        patch_nums=validate_patch_nums(patch_nums), quant_resi=resi, share_quant_resi=share,
        quant_conv_ks=int(state_dict['quant_conv.weight'].shape[-1]) if 'quant_conv.weight' in state_dict else 3,
        using_sa=f'encoder.down.{levels - 1}.attn.0.qkv.weight' in state_dict,
        using_mid_sa='encoder.mid.attn_1.qkv.weight' in state_dict)


def infer_var_config(state_dict, patch_nums: Sequence[int] = PATCH_NUMS_256,
                     num_heads: Optional[int] = None) -> dict:
    """VAR constructor arguments from the keys and shapes of an official VAR state dict.

    Heads come from scale_mul_1H11 when present (l2-norm attention); otherwise from num_heads or
    the official head width 64.
    """
    _require(state_dict, 'word_embed.weight', 'class_emb.weight', 'head.weight', 'blocks.0.ffn.fc1.weight')
    C, cvae = state_dict['word_embed.weight'].shape
    l2 = 'blocks.0.attn.scale_mul_1H11' in state_dict
    heads = state_dict['blocks.0.attn.scale_mul_1H11'].shape[1] if l2 else (num_heads or max(C // 64, 1))
    depth = _count_indices(state_dict, r'^blocks\.(\d+)\.')
    return dict(
        vocab_size=int(state_dict['head.weight'].shape[0]), cvae=int(cvae),
        num_classes=int(state_dict['class_emb.weight'].shape[0]) - 1,
        depth=depth, embed_dim=int(C), num_heads=int(heads),
        mlp_ratio=state_dict['blocks.0.ffn.fc1.weight'].shape[0] / C,
        shared_aln='shared_ada_lin.1.weight' in state_dict, attn_l2_norm=l2,
        drop_path_rate=0.1 * depth / 24, patch_nums=validate_patch_nums(patch_nums))


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
        raise CheckpointMismatchError(f"width {cfg['embed_dim']} is not divisible by {cfg['num_heads']} heads; "
                                      f"pass num_heads")
    if 'pos_1LC' in state_dict and state_dict['pos_1LC'].shape[1] != L:
        raise CheckpointMismatchError(
            f"the checkpoint has {state_dict['pos_1LC'].shape[1]} tokens but patch_nums {cfg['patch_nums']} "
            f"give {L}; pass the patch_nums it was trained with (256 px: {PATCH_NUMS_256}, 512 px: {PATCH_NUMS_512})")
    if 'lvl_1L' in state_dict and not np.array_equal(np.asarray(state_dict['lvl_1L']).reshape(-1),
                                                     level_ids(cfg['patch_nums'])):
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


def _as_json(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def save_pretrained(out_dir: str, vae_cfg: dict, vae_params, var_cfg: Optional[dict] = None, var_params=None):
    """Writes params as an orbax checkpoint (out_dir/params) and the model config (out_dir/model.json)."""
    import orbax.checkpoint as ocp
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tree = {'vae': vae_params} | ({'var': var_params} if var_params is not None else {})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, 'params'), tree, force=True)
    cfg = {'vae': _as_json(vae_cfg)} | ({'var': _as_json(var_cfg)} if var_cfg is not None else {})
    tmp = os.path.join(out_dir, 'model.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, 'model.json'))


def load_pretrained(ckpt_dir: str):
    """Reads what `save_pretrained` wrote: ({'vae': kwargs, 'var': kwargs}, {'vae': params, 'var': params})."""
    import orbax.checkpoint as ocp
    ckpt_dir = os.path.abspath(ckpt_dir)
    cfg_path = os.path.join(ckpt_dir, 'model.json')
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f'{cfg_path} not found: {ckpt_dir} is not a converted checkpoint; '
                                f'create one with python -m var_jax.convert --vae ... --var ... --out {ckpt_dir}')
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg = {name: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()} for name, c in cfg.items()}
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(ckpt_dir, 'params'))
    return cfg, params


def main(argv=None):
    p = argparse.ArgumentParser(description='Convert official VAR checkpoints (.pth) to a var_jax checkpoint.')
    p.add_argument('--vae', required=True, help='official VQVAE state dict, e.g. vae_ch160v4096z32.pth')
    p.add_argument('--var', help='official VAR state dict, e.g. var_d16.pth')
    p.add_argument('--out', required=True, help='output directory (orbax params + model.json)')
    p.add_argument('--patch_nums', default=None,
                   help='comma-separated scale sides; default: the 256-px schedule (the 512-px one for L=2240)')
    args = p.parse_args(argv)
    var_sd = load_torch_state_dict(args.var) if args.var else None
    if args.patch_nums:
        pns = tuple(int(x) for x in args.patch_nums.split(','))
    elif var_sd is not None and 'pos_1LC' in var_sd and var_sd['pos_1LC'].shape[1] == sum(p * p for p in PATCH_NUMS_512):
        pns = PATCH_NUMS_512
    else:
        pns = PATCH_NUMS_256
    vae_cfg, vae_params = convert_vae(load_torch_state_dict(args.vae), pns)
    var_cfg, var_params = convert_var(var_sd, pns) if var_sd is not None else (None, None)
    if var_cfg and (var_cfg['vocab_size'], var_cfg['cvae']) != (vae_cfg['vocab_size'], vae_cfg['z_channels']):
        raise CheckpointMismatchError(
            f"the VAR expects vocabulary {var_cfg['vocab_size']} and Cvae {var_cfg['cvae']} but the VQVAE has "
            f"{vae_cfg['vocab_size']} and {vae_cfg['z_channels']}: use the tokenizer it was trained with")
    save_pretrained(args.out, vae_cfg, vae_params, var_cfg, var_params)
    n = sum(x.size for x in jax.tree.leaves({'vae': vae_params, 'var': var_params}))
    print(f'wrote {args.out}: {n:,} parameters; VQVAE {vae_cfg}; VAR {var_cfg}')


if __name__ == '__main__':
    main()
