"""Token draws from logits for the sampler (official models/helpers.py, sample_with_top_k_top_p_):
temperature, top-k and top-p as thresholds found by search (no sort), and one categorical draw per row.
Traced per target platform (`platform.target_platform()`): the searches' width and the draw's method
differ between CPU and TPU / GPU, the thresholds and the distribution do not."""

from typing import Optional

import jax
import jax.numpy as jnp

from var_jax.models.platform import target_platform


def _order_key(x):
    """float32 -> uint32 with the same order (so thresholds can be searched bit by bit); -0.0 == +0.0."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _as_float(t):
    """uint32 bit patterns of non-negative float32 -> those floats; patterns above +inf become +inf."""
    return jax.lax.bitcast_convert_type(jnp.minimum(t, jnp.uint32(0x7F800000)), jnp.float32)


# Bits of a threshold that one pass of the searches decides, per target platform. On accelerators 4: 8 passes
# over the logits, each comparing every entry with 15 candidates at once (the compares are cheap, the passes'
# memory traffic is not, so fewer passes are faster in XLA's estimates). On CPU 1: 32 passes of one compare,
# the fewest operations (wider passes made the CPU draws slower). Same thresholds.
SEARCH_BITS = {'cpu': 1, 'gpu': 4, 'tpu': 4}


def _largest_true(pred, shape, unroll: int = 1):
    """Per row, the largest uint32 t with pred(t) true, for pred true at 0 and monotone (true, then false).

    Builds t from the top digit down, SEARCH_BITS bits per pass: pred gets the candidates (..., m) of the
    next digit (t plus each of its m = 2^bits - 1 non-zero values) and says (..., m) which hold; being
    monotone, their count is the digit. unroll: passes written out per loop body; 1 in use (one small body
    to compile), all of them for benchmarks/aot.py, since XLA's cost analysis counts a loop body once.
    """
    bits = SEARCH_BITS[target_platform()]
    digits = jnp.arange(1, 2**bits, dtype=jnp.uint32)

    def body(i, t):
        shift = (32 - bits * (i + 1)).astype(jnp.uint32)
        ok = pred(t + (digits << shift))
        return t + (jnp.sum(ok, axis=-1, keepdims=True).astype(jnp.uint32) << shift)

    return jax.lax.fori_loop(0, 32 // bits, body, jnp.zeros(shape, jnp.uint32), unroll=unroll)


def filter_logits(
    logits, *, top_k: int = 0, top_p=0.0, temperature=1.0, use_top_p: Optional[bool] = None, search_unroll: int = 1
):
    """Temperature, then top-k, then top-p; removed entries become -inf (official order: sample_with_top_k_top_p_).

    top_k (static int, 0 = off): keep logits >= the k-th largest (ties kept, so > k may survive).
    top_p (0 = off): in ascending order drop the entries whose cumulative probability is
    <= 1 - top_p, never the largest. `use_top_p` is the static switch (defaults to top_p > 0
    when top_p is a Python number) so top_p itself can be a traced value.

    Both filters are thresholds, found without sorting (XLA's CPU sort and top_k are slow): the
    k-th largest logit is the largest t with #{logits >= t} >= k, and the top-p cut is the
    largest probability t with P(p < t) <= 1 - top_p, i.e. the smallest probability whose ascending
    cumulative sum exceeds 1 - top_p. Everything tied with a cut value is kept. The top-p search runs
    on the probabilities themselves (non-negative floats order as their bits), so each pass reads one array.
    search_unroll: see `_largest_true`.
    """
    logits = logits.astype(jnp.float32) / temperature
    V = logits.shape[-1]
    if use_top_p is None:
        use_top_p = float(top_p) > 0
    if top_k > V:  # torch.topk in the official sampler raises here too
        raise ValueError(f'top_k={top_k} exceeds the vocabulary size {V}; use top_k <= {V} (or 0 = off)')
    if top_k == V:  # keeps everything
        top_k = 0
    if top_k <= 0 and not use_top_p:
        return logits
    rows = logits.shape[:-1] + (1,)
    each = lambda x: x[..., None, :]  # (..., 1, V) against candidates (..., m, 1)
    if top_k > 0:
        key = _order_key(logits)
        kth = _largest_true(lambda t: jnp.sum(each(key) >= t[..., None], axis=-1) >= top_k, rows, search_unroll)
        logits = jnp.where(key < kth, -jnp.inf, logits)
    if use_top_p:
        p = jax.nn.softmax(logits, axis=-1)
        below = lambda t: jnp.where(each(p) < _as_float(t)[..., None], each(p), 0.0)
        cut = _largest_true(lambda t: jnp.sum(below(t), axis=-1) <= 1 - top_p, rows, search_unroll)
        logits = jnp.where(p < _as_float(cut), -jnp.inf, logits)
    return logits


def categorical(key, logits):
    """One draw per row of softmax(logits) (..., V); entries at -inf are never drawn.

    On CPU by inverse CDF, one uniform per row: ~4x cheaper there than `jax.random.categorical`, which
    draws a Gumbel variate for every vocabulary entry. On TPU / GPU that Gumbel-max draw, because there the
    inverse CDF's cumulative sum over the vocabulary is the slow part (in XLA's estimates for TPU). The same
    distribution, not the same draws: a key samples differently on a CPU.
    """
    if target_platform() != 'cpu':
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    cdf = jnp.cumsum(probs, axis=-1)
    total = cdf[..., -1:]
    u = jnp.minimum(jax.random.uniform(key, total.shape) * total, jnp.nextafter(total, 0))
    return jnp.sum(cdf <= u, axis=-1).astype(jnp.int32)  # first entry whose cdf exceeds u


def sample_logits(
    key, logits, *, top_k: int = 0, top_p=0.0, temperature=1.0, use_top_p: Optional[bool] = None, search_unroll: int = 1
):
    """Draws one token per row of `logits` (..., V) after `filter_logits`: (idx int32, filtered logits)."""
    masked = filter_logits(
        logits, top_k=top_k, top_p=top_p, temperature=temperature, use_top_p=use_top_p, search_unroll=search_unroll
    )
    return categorical(key, masked), masked
