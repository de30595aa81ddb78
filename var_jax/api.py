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
import numpy as np

from var_jax import checkpoint, convert
from var_jax.models.var import VAR
from var_jax.models.vqvae import VQVAE


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
            raise ValueError(f'VAR {k}={var_kwargs[k]} differs from the tokenizer\'s {v}; '
                             f'the transformer predicts the tokenizer\'s tokens, so set them equal')
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


def load_official(vae_path: str, var_path: Optional[str] = None, patch_nums: Sequence[int] = convert.PATCH_NUMS_256):
    """Official .pth files (or already-loaded state dicts) -> (vqvae, vae_params, var, var_params)."""
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


def check_images(images, image_size: int):
    """Raises a clear error unless images are (B, R, R, 3) with values in [-1, 1]."""
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[1:] != (image_size, image_size, 3):
        hint = ' (NCHW? transpose to NHWC)' if len(shape) == 4 and shape[1] == 3 else ''
        raise ValueError(f'images must be NHWC (B, {image_size}, {image_size}, 3), got {shape}{hint}')
    if not isinstance(images, jax.core.Tracer):
        lo, hi = float(jnp.min(images)), float(jnp.max(images))
        if lo < -1 - 1e-3 or hi > 1 + 1e-3:
            raise ValueError(f'image values must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]; '
                             f'map uint8 pixels with x / 127.5 - 1')


def check_labels(labels, num_classes: int, allow_null: bool = False):
    """Raises a clear error for labels outside [0, num_classes) (or num_classes, the null class)."""
    if isinstance(labels, jax.core.Tracer):
        return
    labels = np.asarray(labels)
    hi = num_classes + 1 if allow_null else num_classes
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'labels must be a 1-D integer array, got {labels.dtype} {labels.shape}')
    if labels.size and (labels.min() < 0 or labels.max() >= hi):
        raise ValueError(f'labels must lie in [0, {hi}) for a model with {num_classes} classes, '
                         f'got values in [{labels.min()}, {labels.max()}]')


@functools.partial(jax.jit, static_argnums=0)
def _encode(vqvae, params, images):
    return vqvae.apply({'params': params}, images, method=VQVAE.img_to_idx)


@functools.partial(jax.jit, static_argnums=0)
def _decode(vqvae, params, idx):
    return vqvae.apply({'params': params}, idx, method=VQVAE.idx_to_img)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _logits(vqvae, vae_params, var, var_params, idx, labels):
    x = vqvae.apply({'params': vae_params}, idx, method=VQVAE.idx_to_var_input)
    return var.apply({'params': var_params}, labels, x)


def encode(vqvae: VQVAE, vae_params, images):
    """Images (B, R, R, 3) in [-1, 1] -> per-scale token indices [(B, pn^2) int32]."""
    check_images(images, vqvae.image_size)
    return _encode(vqvae, vae_params, jnp.asarray(images, jnp.float32))


def decode(vqvae: VQVAE, vae_params, idx):
    """Per-scale token indices -> images (B, R, R, 3) in [-1, 1]."""
    _check_idx(idx, vqvae.patch_nums, vqvae.vocab_size)
    return _decode(vqvae, vae_params, [jnp.asarray(i, jnp.int32) for i in idx])


def teacher_forcing_logits(vqvae: VQVAE, vae_params, var: VAR, var_params, idx, labels):
    """Logits (B, L, V) of every token given the ground-truth coarser scales (evaluation mode).

    idx: per-scale indices from `encode` (or images, which are encoded first).
    """
    if not isinstance(idx, (list, tuple)):
        idx = encode(vqvae, vae_params, idx)
    _check_idx(idx, vqvae.patch_nums, vqvae.vocab_size)
    check_labels(labels, var.num_classes, allow_null=True)
    return _logits(vqvae, vae_params, var, var_params, [jnp.asarray(i, jnp.int32) for i in idx],
                   jnp.asarray(labels, jnp.int32))


def _check_idx(idx, patch_nums, vocab_size):
    want = [pn * pn for pn in patch_nums]
    got = [np.shape(i)[-1] if np.ndim(i) == 2 else None for i in idx]
    if got != want:
        raise ValueError(f'expected one (B, pn^2) index array per scale with pn^2 = {want}, got {got}')
    for i in idx:
        if not isinstance(i, jax.core.Tracer) and (np.min(i) < 0 or np.max(i) >= vocab_size):
            raise ValueError(f'token indices must lie in [0, {vocab_size})')
