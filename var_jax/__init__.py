"""var_jax: VAR (Visual AutoRegressive modeling, next-scale prediction) in JAX/Flax."""

from var_jax.api import (
    build_models,
    check_images,
    check_labels,
    decode,
    encode,
    init_params,
    load_official,
    load_pretrained,
    teacher_forcing_logits,
)
from var_jax.hub import from_pretrained
from var_jax.models.var import VAR, var_config_for_depth
from var_jax.models.vqvae import VQVAE

__all__ = [
    'VAR',
    'VQVAE',
    'build_models',
    'check_images',
    'check_labels',
    'decode',
    'encode',
    'from_pretrained',
    'init_params',
    'load_official',
    'load_pretrained',
    'teacher_forcing_logits',
    'var_config_for_depth',
]
