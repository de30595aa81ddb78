"""PyTorch-exact resizing as precomputed per-axis matrices.

`jax.image.resize` differs from `torch.nn.functional.interpolate` in the modes VAR uses:
its cubic kernel is Keys A=-0.5 with edge renormalisation and it antialiases when
downsampling. The official tokenizer uses torch's 'area' (adaptive average pooling),
'bicubic' (A=-0.75, half-pixel centres, clamped taps) and, for the edit mask, 'bilinear'.
Each mode is separable, so a resize of an (H, W) map is M_h @ x @ M_w^T with 1-D matrices
computed once in float64 (they match torch to ~1e-15 in float64).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _cubic_weights(t: float, a: float = -0.75) -> tuple:
    """Keys cubic convolution weights of the 4 taps at x0-1, x0, x0+1, x0+2 (torch's A=-0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=None)
def resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """The (n_out, n_in) float64 matrix of torch's 1-D `interpolate(size=n_out, mode=method)`.

    method: 'area' (adaptive average pooling bins [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))),
    'bicubic' or 'bilinear' (align_corners=False, no antialias).
    """
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f'resize sizes must be positive, got {n_in} -> {n_out}')
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        if method == 'area':
            lo, hi = math.floor(i * n_in / n_out), math.ceil((i + 1) * n_in / n_out)
            m[i, lo:hi] = 1.0 / (hi - lo)
        elif method == 'bicubic':
            src = (i + 0.5) * scale - 0.5  # torch does not clamp the source index for cubic
            x0 = math.floor(src)
            for k, w in enumerate(_cubic_weights(src - x0)):
                m[i, min(max(x0 - 1 + k, 0), n_in - 1)] += w
        elif method == 'bilinear':
            src = max((i + 0.5) * scale - 0.5, 0.0)
            x0 = int(src)
            x1 = x0 + 1 if x0 < n_in - 1 else x0
            t = src - x0
            m[i, x0] += 1.0 - t
            m[i, x1] += t
        else:
            raise ValueError(f"unknown resize method {method!r}; use 'area', 'bicubic' or 'bilinear'")
    return m


def padded_resize_matrix_2d(n_in: int, n_out: int, method: str, pad_in: int, pad_out: int) -> np.ndarray:
    """(pad_out^2, pad_in^2) float64: the 2-D resize of an n_in x n_in map to n_out x n_out, both flattened
    row-major and held in the top-left corner of a pad x pad map (zeros elsewhere), so maps of several sizes
    can be stacked and resized by one batched matmul."""
    r = resize_matrix(n_in, n_out, method)
    m = np.zeros((pad_out, pad_out, pad_in, pad_in))
    m[:n_out, :n_out, :n_in, :n_in] = np.einsum('yi,xj->yxij', r, r)
    return m.reshape(pad_out * pad_out, pad_in * pad_in)


def resize(x: jax.Array, size: tuple, method: str, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """Resizes the spatial axes of an NHWC array exactly like torch's `F.interpolate`.

    x: (B, H, W, C); size: (h, w). Same-size resizes are the identity for every mode and
    are skipped. precision: of the two matmuls (HIGHEST: float32 on TPU/GPU too; None: the backend's default).
    """
    h_in, w_in = x.shape[1], x.shape[2]
    h_out, w_out = size
    if (h_in, w_in) == (h_out, w_out):
        return x
    mh = jnp.asarray(resize_matrix(h_in, h_out, method), x.dtype)
    mw = jnp.asarray(resize_matrix(w_in, w_out, method), x.dtype)
    x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=precision)
    return jnp.einsum('pw,bowc->bopc', mw, x, precision=precision)
