"""Shared fixtures: the official golden outputs and the tiny models converted from them."""
import os

from var_jax import runtime

runtime.keep_freed_memory_on_cpu()  # before JAX starts: faster CPU steps (see its docstring)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Parity with the official float32 outputs needs full-precision matmuls on every backend.
jax.config.update('jax_default_matmul_precision', 'highest')

DATA = os.path.join(os.path.dirname(__file__), 'data')
GOLDEN_PATCH_NUMS = (1, 2, 4, 8)


@pytest.fixture(scope='session')
def golden():
    """tests/data/tiny_public.npz: weights, inputs and outputs of the official code (see README)."""
    return dict(np.load(os.path.join(DATA, 'tiny_public.npz')))


def golden_state_dict(golden, prefix):
    return {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}


@pytest.fixture(scope='session')
def tiny(golden):
    """(vqvae, vae_params, var, var_params) converted from the golden official weights."""
    from var_jax import api
    return api.load_official(golden_state_dict(golden, 'vae/'), golden_state_dict(golden, 'var/'),
                             GOLDEN_PATCH_NUMS)


def nchw(x):
    """Our NHWC maps in the official NCHW layout."""
    return np.asarray(x).transpose(0, 3, 1, 2)
