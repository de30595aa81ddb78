"""The public Python API: build models, load official weights, tokenize, detokenize, score.

    import var_jax
    vqvae, vae_params, var, var_params = var_jax.load_official('vae_ch160v4096z32.pth', 'var_d16.pth')
    idx = var_jax.encode(vqvae, vae_params, images)          # images (B, 256, 256, 3) in [-1, 1]
    recon = var_jax.decode(vqvae, vae_params, idx)           # (B, 256, 256, 3) in [-1, 1]
    logits = var_jax.teacher_forcing_logits(vqvae, vae_params, var, var_params, idx, labels)

The models are plain Flax linen modules; these helpers only add input checks and jit.
"""

import functools
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from var_jax import checkpoint
from var_jax.models.var import PATCH_NUMS_256, VAR
from var_jax.models.vqvae import VQVAE
from var_jax.tokenize import check_idx, check_images, check_labels, decode, encode  # noqa: F401 (the API)


def build_models(vae_kwargs: Mapping, var_kwargs: Mapping):
    """(VQVAE, VAR) from constructor kwargs (dicts or ml_collections ConfigDicts).

    The VAR's vocabulary, Cvae and patch_nums are taken from the tokenizer when not given, and
    must agree with it when they are.
    """
    vqvae = VQVAE(**_tuples(vae_kwargs))
    shared = dict(vocab_size=vqvae.vocab_size, cvae=vqvae.z_channels, patch_nums=tuple(vqvae.patch_nums))
    var_kwargs = _tuples(var_kwargs)
    for k, v in shared.items():
        if k in var_kwargs and var_kwargs[k] != v:
            raise ValueError(
                f"VAR {k}={var_kwargs[k]} differs from the tokenizer's {v}; "
                f"the transformer predicts the tokenizer's tokens, so set them equal"
            )
    return vqvae, VAR(**(shared | var_kwargs))


def _tuples(kwargs: Mapping) -> dict:
    kwargs = dict(kwargs.to_dict() if hasattr(kwargs, 'to_dict') else kwargs)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def init_params(vqvae: VQVAE, var: VAR, key):
    """Fresh (vae_params, var_params) with the official initialisation of the transformer."""
    k1, k2 = jax.random.split(key)
    R = vqvae.image_size
    vae_params = jax.jit(vqvae.init)(k1, jnp.zeros((1, R, R, 3)))['params']
    L = sum(p * p for p in var.patch_nums)
    x = jnp.zeros((1, L - var.patch_nums[0] ** 2, var.cvae))
    var_params = jax.jit(var.init)(k2, jnp.zeros((1,), jnp.int32), x)['params']
    return vae_params, var_params


def load_official(vae_path: str, var_path: Optional[str] = None, patch_nums: Sequence[int] = PATCH_NUMS_256):
    """Official .pth files (or already-loaded state dicts) -> (vqvae, vae_params, var, var_params)."""
    from var_jax import convert  # the only torch reader, imported when official files are read

    vae_sd = convert.load_torch_state_dict(vae_path) if isinstance(vae_path, str) else vae_path
    vae_cfg, vae_params = convert.convert_vae(vae_sd, patch_nums)
    vqvae = VQVAE(**vae_cfg)
    if var_path is None:
        return vqvae, vae_params, None, None
    var_sd = convert.load_torch_state_dict(var_path) if isinstance(var_path, str) else var_path
    var_cfg, var_params = convert.convert_var(var_sd, patch_nums)
    _, var = build_models(vae_cfg, var_cfg)
    return vqvae, vae_params, var, var_params


def load_pretrained(ckpt_dir: str):
    """A directory written by `python -m var_jax.convert` -> (vqvae, vae_params, var, var_params)."""
    cfg, params = checkpoint.load_pretrained(ckpt_dir)
    if 'var' not in cfg:
        return VQVAE(**cfg['vae']), params['vae'], None, None
    vqvae, var = build_models(cfg['vae'], cfg['var'])
    return vqvae, params['vae'], var, params['var']


@functools.partial(jax.jit, static_argnums=(0, 2))
def _logits(vqvae, vae_params, var, var_params, idx, labels):
    x = vqvae.apply({'params': vae_params}, idx, method=VQVAE.idx_to_var_input)
    return var.apply({'params': var_params}, labels, x)


def teacher_forcing_logits(vqvae: VQVAE, vae_params, var: VAR, var_params, idx, labels):
    """Logits (B, L, V) of every token given the ground-truth coarser scales (evaluation mode).

    idx: per-scale indices from `encode` (or images, which are encoded first).
    """
    if not isinstance(idx, (list, tuple)):
        idx = encode(vqvae, vae_params, idx)
    check_idx(idx, vqvae.patch_nums, vqvae.vocab_size)
    check_labels(labels, var.num_classes, allow_null=True)
    return _logits(
        vqvae, vae_params, var, var_params, [jnp.asarray(i, jnp.int32) for i in idx], jnp.asarray(labels, jnp.int32)
    )
