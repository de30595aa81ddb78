"""The VAR transformer (VAR_SPEC 2): next-scale prediction with block-causal attention.

The sequence holds every scale's tokens, coarse to fine (L = sum pn^2). Token l sees all tokens
of its own scale and of every coarser scale. Class conditioning enters twice: as the start
token and through AdaLN in every block and in the head. Submodule and parameter names follow
the official state dict so the converter is a renaming plus layout changes.

Sequences are (B, L, C); full-sequence attention runs through `jax.nn.dot_product_attention`
with an explicit scale so XLA (or cuDNN on GPU) picks the kernel; the sampler's cached
attention (`_cached_attention`) keeps its KV cache head-major.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models.quantizer import validate_patch_nums

MAX_LOG_SCALE_MUL = math.log(100.0)


def begin_ends(patch_nums: Sequence[int]) -> tuple:
    """(begin, end) token offsets of each scale in the flattened sequence."""
    out, cur = [], 0
    for pn in patch_nums:
        out.append((cur, cur + pn * pn))
        cur += pn * pn
    return tuple(out)


def level_ids(patch_nums: Sequence[int]) -> np.ndarray:
    """Scale index of every token, (L,) int32."""
    return np.concatenate([np.full(pn * pn, si, np.int32) for si, pn in enumerate(patch_nums)])


def block_causal_mask(patch_nums: Sequence[int]) -> np.ndarray:
    """(L, L) bool: query i may attend key j iff level(j) <= level(i)."""
    lvl = level_ids(patch_nums)
    return lvl[:, None] >= lvl[None, :]


def trunc_normal(std: float, scale: Any = 1.0):
    """torch.nn.init.trunc_normal_(std=std) (cut at +-2 absolute, not +-2 std) times `scale`.

    `scale` may be an array broadcast against the param (e.g. per output column).
    """
    def init(key, shape, dtype=jnp.float32):
        x = std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, jnp.float32)
        return (x * jnp.asarray(scale, jnp.float32)).astype(dtype)
    return init


def _layer_norm(x, eps):
    """LayerNorm without affine parameters, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _l2_normalize(x, eps=1e-12):
    """torch F.normalize: x / max(||x||, eps) over the last axis."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


def _cached_attention(q, k, v, cache, begin: int, scale: float):
    """Writes k, v (B, N, H, hd) at [begin, begin+N) of the cache; q attends to cache[:begin+N].

    The cache is head-major (B, H, L, hd), the layout the two attention matmuls consume, so
    only the N new tokens are transposed per step, never the cached L (on CPU the transposes of
    a token-major cache cost more than the attention itself). Returns ((B, N, H, hd), cache).
    """
    end = begin + q.shape[1]
    heads_first = lambda t, c: t.transpose(0, 2, 1, 3).astype(c.dtype)
    cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], heads_first(t, cache[name]), begin, 2)
             for name, t in (('k', k), ('v', v))}
    keys, values = cache['k'][:, :, :end].astype(q.dtype), cache['v'][:, :, :end].astype(q.dtype)
    s = jnp.einsum('bnhd,bhsd->bhns', q, keys, preferred_element_type=jnp.float32) * scale
    p = jax.nn.softmax(s, axis=-1).astype(values.dtype)
    return jnp.einsum('bhns,bhsd->bnhd', p, values), cache


class SelfAttention(nn.Module):
    """Multi-head self-attention; keys have no bias; optional l2-normalised q/k."""
    embed_dim: int
    num_heads: int
    attn_l2_norm: bool
    init_std: float
    proj_scale: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, cache=None, begin: int = 0):
        """x (B, N, C) -> (B, N, C), plus the updated KV cache when one is given.

        Without a cache, attention is over x itself under `mask` ((N, N) bool or None). With a
        cache {'k','v': (B, H, L, hd)}, x are the tokens at [begin, begin+N): their keys/values
        are written there and the queries attend to every cached position < begin+N (all of
        them are earlier or same-scale tokens, so no mask is needed).
        """
        B, N, C = x.shape
        H = self.num_heads
        hd = C // H
        w = nn.Dense(3 * C, use_bias=False, dtype=self.dtype, kernel_init=trunc_normal(self.init_std),
                     name='mat_qkv')(x)
        q_bias = self.param('q_bias', nn.initializers.zeros, (C,))
        v_bias = self.param('v_bias', nn.initializers.zeros, (C,))
        w = w + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(w.dtype)
        q, k, v = jnp.split(w.reshape(B, N, 3, H, hd), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        if self.attn_l2_norm:
            scale_mul = self.param('scale_mul', nn.initializers.constant(math.log(4.0)), (H,))
            temp = jnp.exp(jnp.minimum(scale_mul, MAX_LOG_SCALE_MUL))
            q = (_l2_normalize(q) * temp[:, None].astype(q.dtype))
            k = _l2_normalize(k)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(hd)
        if cache is None:
            m = None if mask is None else mask[None, None]
            out = jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale).reshape(B, N, C)
        else:
            out, cache = _cached_attention(q, k, v, cache, begin, scale)
            out = out.reshape(B, N, C)
        out = nn.Dense(C, dtype=self.dtype, kernel_init=trunc_normal(self.init_std, self.proj_scale),
                       name='proj')(out)
        return out, cache


class FFN(nn.Module):
    hidden: int
    init_std: float
    proj_scale: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = x.shape[-1]
        h = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=trunc_normal(self.init_std), name='fc1')(x)
        h = nn.gelu(h, approximate=True)
        return nn.Dense(C, dtype=self.dtype, kernel_init=trunc_normal(self.init_std, self.proj_scale),
                        name='fc2')(h)


def _adaln_column_scale(C: int, n: int, init_adaln: float, init_adaln_gamma: float):
    """Init multipliers of the 6 AdaLN chunks (gamma1, gamma2, scale1, scale2, shift1, shift2)."""
    return np.repeat(np.array([init_adaln_gamma] * 2 + [init_adaln] * (n - 2)), C)


class AdaLNSelfAttn(nn.Module):
    """x += gamma1 * Attn(LN(x)(1+scale1)+shift1); x += gamma2 * FFN(LN(x)(1+scale2)+shift2)."""
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    norm_eps: float
    attn_l2_norm: bool
    shared_aln: bool
    drop_path: float
    init_std: float
    depth: int
    init_adaln: float
    init_adaln_gamma: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cond_or_gss, mask=None, cache=None, begin: int = 0, train: bool = False):
        """cond_or_gss: (B, C) class condition, or with shared AdaLN the shared (B, 6, C) output."""
        C = self.embed_dim
        if self.shared_aln:
            def gss_init(key, shape, dtype=jnp.float32):
                mult = _adaln_column_scale(1, 6, self.init_adaln, self.init_adaln_gamma)[:, None]
                return (jax.random.normal(key, shape) / math.sqrt(C) * mult).astype(dtype)
            ada = self.param('ada_gss', gss_init, (6, C)) + cond_or_gss
        else:
            ada = nn.Dense(6 * C, dtype=self.dtype, name='ada_lin', kernel_init=trunc_normal(
                self.init_std, _adaln_column_scale(C, 6, self.init_adaln, self.init_adaln_gamma)))(
                    nn.silu(cond_or_gss)).reshape(-1, 6, C)
        ada = ada[:, None].astype(self.dtype)  # (B, 1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada[:, :, i] for i in range(6))
        proj_scale = 1.0 / math.sqrt(2 * self.depth)

        h, cache = SelfAttention(C, self.num_heads, self.attn_l2_norm, self.init_std, proj_scale,
                                 self.dtype, name='attn')(
            _layer_norm(x, self.norm_eps) * (1 + scale1) + shift1, mask, cache, begin)
        x = x + self._drop_path(h * gamma1, train)
        h = FFN(round(C * self.mlp_ratio), self.init_std, proj_scale, self.dtype, name='ffn')(
            _layer_norm(x, self.norm_eps) * (1 + scale2) + shift2)
        x = x + self._drop_path(h * gamma2, train)
        return x, cache

    def _drop_path(self, x, train):
        """Per-sample stochastic depth (timm DropPath), training only."""
        if not train or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * mask.astype(x.dtype) / keep


class AdaLNBeforeHead(nn.Module):
    embed_dim: int
    norm_eps: float
    init_std: float
    init_adaln: float

    @nn.compact
    def __call__(self, x, cond):
        C = self.embed_dim
        ada = nn.Dense(2 * C, name='ada_lin', kernel_init=trunc_normal(self.init_std, self.init_adaln))(
            nn.silu(cond)).reshape(-1, 1, 2, C)
        scale, shift = ada[:, :, 0], ada[:, :, 1]
        return _layer_norm(x, self.norm_eps) * (1 + scale) + shift


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer.

    Defaults are VAR-d16 at 256 px; `var_config_for_depth` builds the official family.
    `dtype` is the compute dtype of the blocks (params stay float32); logits are float32.
    """
    vocab_size: int = 4096
    cvae: int = 32
    num_classes: int = 1000
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    drop_path_rate: float = 0.0
    cond_drop_rate: float = 0.1
    patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0
    dtype: Any = jnp.float32

    def setup(self):
        pns = validate_patch_nums(self.patch_nums)
        C = self.embed_dim
        if C % self.num_heads:
            raise ValueError(f'embed_dim {C} is not divisible by num_heads {self.num_heads}; '
                             f'choose a width that is a multiple of the number of heads')
        self.begin_ends = begin_ends(pns)
        self.L = self.begin_ends[-1][1]
        std = self.init_std if self.init_std > 0 else math.sqrt(1 / (3 * C))
        init = trunc_normal(std)
        self.word_embed = nn.Dense(C, kernel_init=init)
        self.class_emb = nn.Embed(self.num_classes + 1, C, embedding_init=init)
        self.lvl_embed = nn.Embed(len(pns), C, embedding_init=init)
        self.pos_start = self.param('pos_start', init, (pns[0] ** 2, C))
        self.pos_1LC = self.param('pos_1LC', init, (self.L, C))
        if self.shared_aln:
            self.shared_ada_lin = nn.Dense(6 * C, kernel_init=init)
        rates = np.linspace(0, self.drop_path_rate, self.depth)
        self.blocks = [
            AdaLNSelfAttn(C, self.num_heads, self.mlp_ratio, self.norm_eps, self.attn_l2_norm,
                          self.shared_aln, float(rates[i]), std, self.depth, self.init_adaln,
                          self.init_adaln_gamma, self.dtype)
            for i in range(self.depth)]
        self.head_nm = AdaLNBeforeHead(C, self.norm_eps, std, self.init_adaln)
        self.head = nn.Dense(self.vocab_size, kernel_init=trunc_normal(std, self.init_head))

    # --- pieces shared by the teacher-forced forward and the cached sampler -----------------
    def cond(self, labels):
        """Class embedding (B, C); label num_classes is the null (unconditional) class."""
        return self.class_emb(labels)

    def lvl_pos(self, begin: int, end: int):
        """Level + position embedding of tokens [begin, end): (end-begin, C)."""
        lvl = jnp.asarray(level_ids(self.patch_nums)[begin:end])
        return self.lvl_embed(lvl) + self.pos_1LC[begin:end]

    def start_tokens(self, cond):
        """The first scale's input: class embedding + pos_start + level/position, (B, pn_0^2, C)."""
        b, e = self.begin_ends[0]
        return cond[:, None] + self.pos_start[None] + self.lvl_pos(b, e)[None]

    def scale_tokens(self, si: int, x):
        """Input tokens of scale si >= 1 from its f_hat features x (B, pn_si^2, Cvae)."""
        b, e = self.begin_ends[si]
        return self.word_embed(x.astype(jnp.float32)) + self.lvl_pos(b, e)[None]

    def _cond_or_gss(self, cond):
        if self.shared_aln:
            return self.shared_ada_lin(nn.silu(cond)).reshape(-1, 6, self.embed_dim)
        return cond

    def logits(self, h, cond):
        """Head: AdaLN then the vocabulary projection, in float32."""
        return self.head(self.head_nm(h.astype(jnp.float32), cond)).astype(jnp.float32)

    # --- teacher forcing ---------------------------------------------------------------------
    def __call__(self, labels, x_wo_first, train: bool = False):
        """Teacher-forced logits (B, L, V).

        labels: (B,) int in [0, num_classes); x_wo_first: (B, L - pn_0^2, Cvae), the quantizer's
        `idx_to_var_input`. In training mode labels are replaced by the null class with
        probability cond_drop_rate and drop path is active (rng stream 'dropout'). Unlike the
        official forward, evaluation mode never drops labels.
        """
        if train and self.cond_drop_rate > 0:
            drop = jax.random.uniform(self.make_rng('dropout'), labels.shape) < self.cond_drop_rate
            labels = jnp.where(drop, self.num_classes, labels)
        cond = self.cond(labels)
        first = self.begin_ends[0][1]
        x = jnp.concatenate([self.start_tokens(cond),
                             self.word_embed(x_wo_first.astype(jnp.float32)) + self.lvl_pos(first, self.L)[None]],
                            axis=1)
        mask = jnp.asarray(block_causal_mask(self.patch_nums))
        cond_or_gss = self._cond_or_gss(cond)
        h = x.astype(self.dtype)
        for block in self.blocks:
            h, _ = block(h, cond_or_gss, mask=mask, train=train)
        return self.logits(h, cond)

    # --- cached autoregressive step ----------------------------------------------------------
    def init_cache(self, batch: int, dtype=None):
        """Empty KV cache: per block {'k','v': (batch, H, L, hd)}."""
        shape = (batch, self.num_heads, self.L, self.embed_dim // self.num_heads)
        dt = dtype or self.dtype
        return [{'k': jnp.zeros(shape, dt), 'v': jnp.zeros(shape, dt)} for _ in range(self.depth)]

    def step(self, si: int, tokens, cond, cache):
        """One scale of autoregressive inference: (logits (B, pn^2, V), new cache).

        tokens: scale si's input (B, pn_si^2, C) from `start_tokens` or `scale_tokens`; the
        cache holds keys/values of all coarser scales.
        """
        begin = self.begin_ends[si][0]
        cond_or_gss = self._cond_or_gss(cond)
        h = tokens.astype(self.dtype)
        new_cache = []
        for block, c in zip(self.blocks, cache):
            h, c = block(h, cond_or_gss, cache=c, begin=begin)
            new_cache.append(c)
        return self.logits(h, cond), new_cache


def var_config_for_depth(depth: int, *, shared_aln: bool = False, **overrides) -> dict:
    """Constructor arguments of the official VAR-d<depth>: width 64*d, d heads, drop path 0.1*d/24.

    d36 is the 512-px model with shared AdaLN; pass patch_nums=(1,2,3,4,6,9,13,18,24,32) and
    shared_aln=True for it.
    """
    cfg = dict(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
               shared_aln=shared_aln, attn_l2_norm=True, norm_eps=1e-6, cond_drop_rate=0.1)
    cfg.update(overrides)
    return cfg
