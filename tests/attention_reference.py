"""The attention tests' reference: block-causal softmax attention in float64, and the scale sizes they use."""

import numpy as np

SIZES = (1, 4, 9, 16, 36, 64, 100, 144)  # L = 374: three 128-token tiles after padding, the last partial


def reference(q, k, v, sizes, scale):
    """Masked softmax attention in float64, written from the definition."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    ids = np.repeat(np.arange(len(sizes)), sizes)
    s = np.einsum('bhqd,bhkd->bhqk', q, k) * scale
    s = np.where(ids[:, None] >= ids[None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum('bhqk,bhkd->bhqd', p, v)
