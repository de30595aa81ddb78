"""Block-causal multi-head attention for VAR: XLA, Pallas splash (TPU) and cuDNN (GPU) implementations.

VAR's mask is block-causal: the sequence is cut into blocks (one per scale, `sizes` tokens each) and a
query sees every key of its own block and of all earlier blocks. Implementations:

- 'xla':    dense softmax attention with the (L, L) mask; XLA materialises the (B, H, L, L)
            probabilities (and keeps them for the backward pass). Works everywhere; the CPU default.
- 'splash': the Pallas TPU splash-attention kernel with the mask as its block-sparse mask: fully masked
            (128 x 128) tiles are skipped, never computed, and no (B, H, L, L) array exists in the forward
            or the backward pass. The sampler's cached attention uses it too (keys padded to whole tiles
            and masked). Off TPU it runs in Pallas interpret mode (slow; for tests).
- 'cudnn':  cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation='cudnn')`), the
            mask as an additive (1, 1, L, L) bias; bf16/fp16 only, GPU only.
- 'auto':   'splash' on TPU, 'cudnn' on GPU for bf16/fp16 inputs, else 'xla'.

The platform is `platform.target_platform()`: the default backend, or the one a deviceless
ahead-of-time compile is for (benchmarks/aot.py).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.platform import target_platform

IMPLEMENTATIONS = ('auto', 'xla', 'splash', 'cudnn')
SPLASH_BLOCK = 128  # splash tile side (q and kv); sequences are padded to a multiple of it
CACHED_SPLASH_MIN_QUERIES = 32  # the sampler's attention: splash from this many queries per scale on


def resolve(implementation: str, dtype) -> str:
    """The concrete implementation of `implementation` for the target platform and compute dtype."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f'attention={implementation!r} is not one of {IMPLEMENTATIONS}')
    if implementation != 'auto':
        return implementation
    platform = target_platform()
    if platform == 'tpu':
        return 'splash'
    if platform == 'gpu' and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return 'cudnn'
    return 'xla'


def block_ids(sizes: Sequence[int]) -> np.ndarray:
    """Block index of every token, (sum(sizes),) int32."""
    return np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(sizes)])


def block_causal(sizes: Sequence[int]) -> np.ndarray:
    """(L, L) bool: query i may attend key j iff block(j) <= block(i)."""
    ids = block_ids(sizes)
    return ids[:, None] >= ids[None, :]


def padding(n: int, implementation: str, dtype) -> int:
    """Tokens to append to a sequence of n before `attend`: splash works on whole tiles, and padding the
    block's input once lets q, k, v come out of their matmul already tiled (no pad copy of each)."""
    if resolve(implementation, dtype) != 'splash':
        return 0
    return -n % SPLASH_BLOCK


def sequence_minor() -> bool:
    """Whether q, k, v (and the sampler's KV cache) are sequence-minor, (B, H, hd, L), instead of head-major,
    (B, H, L, hd): on TPU, where a head-major (.., L, 64) array fills half of each 128-lane tile, so every read,
    copy and slice of it moves twice its bytes; splash reads either layout. Sequence-minor saves both time
    and temporaries in XLA's estimates of the train step and the sampler (docs/benchmarks.md). Elsewhere
    head-major: XLA:CPU samples slower sequence-minor."""
    return target_platform() == 'tpu'


def token_axis(seq_minor: bool) -> int:
    """The axis of q, k, v and of the KV cache that holds the tokens: the last in the sequence-minor layout
    (.., hd, L), the second to last in the head-major one (.., L, hd)."""
    return -1 if seq_minor else -2


def attend(q, k, v, *, sizes: Sequence[int], scale: float, implementation: str = 'auto', seq_minor: bool = False):
    """Block-causal attention. q, k, v: head-major (B, H, L, hd), or with seq_minor (B, H, hd, L), with
    L = sum(sizes) -> (B, H, L, hd).

    `sizes` (static) are the block lengths; `scale` multiplies the logits q.k. Both layouts are splash's
    own, so no transposes are needed around it.
    """
    sizes = tuple(int(s) for s in sizes)
    n = q.shape[token_axis(seq_minor)]
    if n != sum(sizes):
        raise ValueError(f'attention over {n} tokens but the blocks {sizes} hold {sum(sizes)}')
    impl = resolve(implementation, q.dtype)
    if impl == 'splash':
        return _splash(q, k, v, splash_mask(sizes), scale, seq_minor)
    if seq_minor:  # XLA and cuDNN choose their own layouts
        q, k, v = (x.swapaxes(-1, -2) for x in (q, k, v))
    mask = jnp.asarray(block_causal(sizes))
    if impl == 'cudnn':  # cuDNN takes (B, L, H, hd)
        t = lambda x: x.transpose(0, 2, 1, 3)
        return t(
            jax.nn.dot_product_attention(t(q), t(k), t(v), mask=mask[None, None], scale=scale, implementation='cudnn')
        )
    return _softmax_attention(q, k, v, scale, mask)


def attend_cached(q, k, v, *, scale: float, implementation: str = 'auto', seq_minor: bool = False):
    """The sampler's attention: the N queries of one scale attend to every key so far, the cache and their own
    block's (S = P + N, no mask). q (B, H, N, hd) and k, v (B, H, S, hd), or with seq_minor all three
    (B, H, hd, .). Returns (B, H, N, hd).

    Splash (from CACHED_SPLASH_MIN_QUERIES queries on): queries and keys padded to whole tiles, the padded
    keys masked. XLA's dense path writes and reads float32 (B, H, N, S) logits, which at the last scales
    are a large share of a block's time; for a few queries the dense logits are small and the kernel's tile
    padding costs more.
    """
    axis = token_axis(seq_minor)
    n, total = q.shape[axis], k.shape[axis]
    if resolve(implementation, q.dtype) == 'splash' and n >= CACHED_SPLASH_MIN_QUERIES:
        return _splash(q, k, v, cached_mask(n, total), scale, seq_minor)
    if seq_minor:
        q, k, v = (x.swapaxes(-1, -2) for x in (q, k, v))
    return _softmax_attention(q, k, v, scale)


def _softmax_attention(q, k, v, scale, mask=None):
    """Dense attention on head-major arrays, logits and softmax in float32; every query row sees a key."""
    s = jnp.einsum('bhnd,bhsd->bhns', q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    return jnp.einsum('bhns,bhsd->bhnd', jax.nn.softmax(s, axis=-1).astype(v.dtype), v)


# --- splash attention --------------------------------------------------------------------------
def splash_mask(sizes: Sequence[int], block: int = SPLASH_BLOCK) -> np.ndarray:
    """The block-causal mask padded to a multiple of `block`: padded keys are never visible, padded
    queries see all real keys (so their softmax is finite; their rows are dropped)."""
    L = sum(sizes)
    Lp = -(-L // block) * block
    ids = np.concatenate([block_ids(sizes), np.full(Lp - L, len(sizes), np.int32)])
    key_ids = np.where(np.arange(Lp) < L, ids, len(sizes) + 1)
    return ids[:, None] >= key_ids[None, :]


def cached_mask(n: int, total: int, block: int = SPLASH_BLOCK) -> np.ndarray:
    """The sampler's mask padded to whole tiles: n queries (one scale) see all `total` real keys (the cache
    and their own); padded keys are never visible, padded queries see the real keys (their rows are dropped)."""
    tiles = lambda x: -(-x // block) * block
    return np.broadcast_to(np.arange(tiles(total)) < total, (tiles(n), tiles(total)))


def _splash_kernel(mask: np.ndarray, heads: int, interpret: bool, seq_minor: bool = False):
    """Built per trace: the kernel holds its mask tables as arrays, which must belong to the trace."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas only where used

    m = sa.NumpyMask(np.ascontiguousarray(mask))
    b = SPLASH_BLOCK
    blocks = sa.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
        **({f'{x}_layout': sa.QKVLayout.SEQ_MINOR for x in 'qkv'} if seq_minor else {}),
    )
    return sa.make_splash_mha(
        sa.MultiHeadMask([m] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _splash(q, k, v, mask, scale, seq_minor=False):
    """Splash attention with `mask` (queries x keys, both padded to whole tiles); q (B, H, N, hd) and k, v
    (B, H, S, hd), or all three (B, H, hd, .) with seq_minor, are padded to it where not yet tiled ->
    (B, H, N, hd)."""
    (Nq, Nk), N = mask.shape, q.shape[token_axis(seq_minor)]
    kernel = _splash_kernel(mask, q.shape[1], target_platform() != 'tpu', seq_minor)
    axis = token_axis(seq_minor)

    def pad(t, n):
        widths = [(0, 0)] * 4
        widths[axis] = (0, n - t.shape[axis])
        t = jnp.pad(t, widths) if n > t.shape[axis] else t
        # The kernel takes (.., seq, hd) in every layout and swaps sequence-minor inputs back itself: no transposes.
        return t.swapaxes(-1, -2) if seq_minor else t

    def per_device(q, k, v):
        # Splash takes unscaled logits, so the scale goes into q.
        return jax.vmap(kernel)(pad(q * jnp.asarray(scale, q.dtype), Nq), pad(k, Nk), pad(v, Nk))[:, :, :N]

    # A Pallas kernel is opaque to XLA's partitioner: under a mesh (jax.set_mesh), run it per device on
    # the local batch shard (the batch is split over every mesh axis, as var_jax.sharding does).
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return per_device(q, k, v)
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
