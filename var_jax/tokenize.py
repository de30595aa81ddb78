"""Images <-> tokens, checked: the input checks and the jitted encode / decode that the public API
(`var_jax.api`) and the sampler share. Errors are plain ValueErrors with the fix in the message."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.vqvae import VQVAE


def check_images(images, image_size: int):
    """Raises a clear error unless images are (B, R, R, 3) with values in [-1, 1]."""
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[1:] != (image_size, image_size, 3):
        hint = ' (NCHW? transpose to NHWC)' if len(shape) == 4 and shape[1] == 3 else ''
        raise ValueError(f'images must be NHWC (B, {image_size}, {image_size}, 3) in [-1, 1], got {shape}{hint}')
    if not isinstance(images, jax.core.Tracer):
        lo, hi = float(jnp.min(images)), float(jnp.max(images))
        if lo < -1 - 1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f'image values must lie in [-1, 1], got [{lo:.3g}, {hi:.3g}]; map [0, 1] images '
                f'with x * 2 - 1 and uint8 pixels with x / 127.5 - 1'
            )


def check_labels(labels, num_classes: int, allow_null: bool = False):
    """Raises a clear error for labels outside [0, num_classes) (or num_classes, the null class)."""
    if isinstance(labels, jax.core.Tracer):
        return
    labels = np.asarray(labels)
    hi = num_classes + 1 if allow_null else num_classes
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'labels must be a 1-D integer array, got {labels.dtype} {labels.shape}')
    if labels.size and (labels.min() < 0 or labels.max() >= hi):
        raise ValueError(
            f'labels must lie in [0, {hi}) for a model with {num_classes} classes, '
            f'got values in [{labels.min()}, {labels.max()}]'
        )


@functools.partial(jax.jit, static_argnums=0)
def _encode(vqvae, params, images):
    return vqvae.apply({'params': params}, images, method=VQVAE.img_to_idx)


@functools.partial(jax.jit, static_argnums=0)
def _decode(vqvae, params, idx):
    return vqvae.apply({'params': params}, idx, method=VQVAE.idx_to_img)


def encode(vqvae: VQVAE, vae_params, images):
    """Images (B, R, R, 3) in [-1, 1] -> per-scale token indices [(B, pn^2) int32]."""
    check_images(images, vqvae.image_size)
    return _encode(vqvae, vae_params, jnp.asarray(images, jnp.float32))


def decode(vqvae: VQVAE, vae_params, idx):
    """Per-scale token indices -> images (B, R, R, 3) in [-1, 1]."""
    check_idx(idx, vqvae.patch_nums, vqvae.vocab_size)
    return _decode(vqvae, vae_params, [jnp.asarray(i, jnp.int32) for i in idx])


def check_idx(idx, patch_nums, vocab_size):
    """Raises a clear error unless idx is one (B, pn^2) array per scale with ids in [0, vocab_size)."""
    want = [pn * pn for pn in patch_nums]
    got = [np.shape(i)[-1] if np.ndim(i) == 2 else None for i in idx]
    if got != want:
        raise ValueError(f'expected one (B, pn^2) index array per scale with pn^2 = {want}, got {got}')
    for i in idx:
        if not isinstance(i, jax.core.Tracer) and (np.min(i) < 0 or np.max(i) >= vocab_size):
            raise ValueError(f'token indices must lie in [0, {vocab_size})')
