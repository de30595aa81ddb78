"""Block-causal multi-head attention for VAR: XLA, Pallas splash (TPU) and cuDNN (GPU) implementations.

VAR's mask is block-causal: the sequence is cut into blocks (one per scale, `sizes` tokens each) and a
query sees every key of its own block and of all earlier blocks. Implementations:

- 'xla':    dense softmax attention with the (L, L) mask; XLA materialises the (B, H, L, L)
            probabilities (and keeps them for the backward pass). Works everywhere; the CPU default.
- 'splash': the Pallas TPU splash-attention kernel with the mask as its block-sparse mask: fully masked
            (128 x 128) tiles are skipped, never computed, and no (B, H, L, L) array exists in the forward
            or the backward pass. Off TPU it runs in Pallas interpret mode (slow; for tests).
- 'cudnn':  cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation='cudnn')`), the
            mask as an additive (1, 1, L, L) bias; bf16/fp16 only, GPU only.
- 'auto':   'splash' on TPU, 'cudnn' on GPU for bf16/fp16 inputs, else 'xla'.

The platform is `jax.default_backend()` unless `compile_target(platform)` says otherwise: compiling
ahead of time for a TPU on a CPU host (benchmarks/aot.py) traces on the CPU backend for the TPU.
"""
import contextlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ('auto', 'xla', 'splash', 'cudnn')
SPLASH_BLOCK = 128  # splash tile side (q and kv); sequences are padded to a multiple of it

_TARGET = [None]  # platform set by compile_target, else None (the default backend)


@contextlib.contextmanager
def compile_target(platform: Optional[str]):
    """Within the block, 'auto' and splash's interpret mode are decided for `platform` ('tpu', 'gpu',
    'cpu') instead of the default backend; for ahead-of-time compilation on another host."""
    old, _TARGET[0] = _TARGET[0], platform
    try:
        yield
    finally:
        _TARGET[0] = old


def target_platform() -> str:
    """'tpu', 'gpu' or 'cpu': the platform the traced program is for."""
    p = _TARGET[0] or jax.default_backend()
    return 'gpu' if p in ('cuda', 'rocm') else p


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


def attend(q, k, v, *, sizes: Sequence[int], scale: float, implementation: str = 'auto'):
    """Block-causal attention. q, k, v: head-major (B, H, L, hd) with L = sum(sizes) -> (B, H, L, hd).

    `sizes` (static) are the block lengths; `scale` multiplies the logits q.k. Head-major is the layout
    of both attention matmuls and of the splash kernel, so no transposes are needed around them.
    """
    sizes = tuple(int(s) for s in sizes)
    if q.shape[2] != sum(sizes):
        raise ValueError(f'attention over {q.shape[2]} tokens but the blocks {sizes} hold {sum(sizes)}')
    impl = resolve(implementation, q.dtype)
    if impl == 'splash':
        return _splash(q, k, v, sizes, scale)
    mask = jnp.asarray(block_causal(sizes))
    if impl == 'cudnn':  # cuDNN takes (B, L, H, hd)
        t = lambda x: x.transpose(0, 2, 1, 3)
        return t(jax.nn.dot_product_attention(t(q), t(k), t(v), mask=mask[None, None], scale=scale,
                                              implementation='cudnn'))
    return _softmax_attention(q, k, v, scale, mask)


def attend_cached(q, k, v, past_k, past_v, *, scale: float):
    """The sampler's attention: q (B, H, N, hd) attends to the past keys/values (B, H, P, hd) and to its
    own block k, v (B, H, N, hd) (all of them, no mask). Returns (B, H, N, hd).

    Each query row is at most (P + N) long, so XLA's dense attention is what fits here.
    """
    keys = jnp.concatenate([past_k.astype(q.dtype), k], axis=2)
    values = jnp.concatenate([past_v.astype(q.dtype), v], axis=2)
    return _softmax_attention(q, keys, values, scale)


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


def _splash_kernel(sizes: tuple, heads: int, interpret: bool):
    """Built per trace: the kernel holds its mask tables as arrays, which must belong to the trace."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # Pallas only where used
    m = sa.NumpyMask(splash_mask(sizes))
    mask = sa.MultiHeadMask([m] * heads)
    b = SPLASH_BLOCK
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, sizes, scale):
    B, H, L, hd = q.shape
    Lp = L + (-L % SPLASH_BLOCK)
    kernel = _splash_kernel(sizes, H, target_platform() != 'tpu')

    def per_device(q, k, v):
        # Splash takes unscaled logits, so the scale goes into q; a sequence not yet tiled is padded here.
        pad = lambda t: jnp.pad(t, ((0, 0), (0, 0), (0, Lp - L), (0, 0))) if Lp > L else t
        return jax.vmap(kernel)(pad(q * jnp.asarray(scale, q.dtype)), pad(k), pad(v))[:, :, :L]

    # A Pallas kernel is opaque to XLA's partitioner: under a mesh (jax.set_mesh), run it per device on
    # the local batch shard (the batch is split over every mesh axis, as var_jax.sharding does).
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return per_device(q, k, v)
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)
