"""The VAR transformer (paper Sec. 3; official models/var.py, basic_var.py): next-scale prediction with
block-causal attention.

The sequence holds every scale's tokens, coarse to fine (L = sum pn^2). Token l sees all tokens
of its own scale and of every coarser scale. Class conditioning enters twice: as the start
token and through AdaLN in every block and in the head. Submodule and parameter names follow
the official state dict so the converter is a renaming plus layout changes.

Sequences are (B, L, C). The `depth` blocks are one `nn.scan` over stacked params (every block
param has a leading depth axis, under 'blocks'), so XLA compiles one block whatever the depth;
`scan=False` unrolls the same params into a loop of blocks. `remat` picks what the backward pass
recomputes, `attention` the kernel (`var_jax.models.attention`). The stacking, the remat policies and the
per-block <-> stacked param layouts are `var_jax.models.stacking`.
"""

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models import attention as attn_lib
from var_jax.models.platform import target_platform
from var_jax.models.quantizer import PATCH_NUMS_256, PATCH_NUMS_512, validate_patch_nums  # noqa: F401
from var_jax.models.stacking import BLOCKS, remat_policy, stacked_blocks

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
    return attn_lib.block_causal([pn * pn for pn in patch_nums])


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


def _l2_normalize(x, axis, eps=1e-12):
    """torch F.normalize: x / max(||x||, eps) over `axis` (the head dim).

    Written as sqrt(max(||x||^2, eps^2)): the same values, and a zero row (splash's padded keys) gets the
    gradient torch gives it instead of sqrt's NaN at 0.
    """
    if axis == -2:  # sequence-minor (TPU): as a contraction, which XLA tiles well; its reduce over the
        # second-minor axis tiles one element per step for short sequences (tens of tokens)
        ss = jnp.einsum(
            '...dn,...dn->...n', x, x, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
        )[..., None, :]
    else:
        ss = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
    norm = jnp.sqrt(jnp.maximum(ss, eps * eps))
    return (x / norm).astype(x.dtype)


class ReshapedDense(nn.Module):
    """nn.Dense's params (kernel (in_features, features), optional bias) applied as one einsum over the kernel
    reshaped to `kernel_shape`, so the matmul reads and writes the layout attention works in (head-major
    q, k, v) and XLA needs no transposes around it."""

    in_features: int
    features: int
    kernel_init: Callable
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, spec: str, kernel_shape: tuple):
        kernel = self.param('kernel', self.kernel_init, (self.in_features, self.features))
        y = jnp.einsum(spec, x.astype(self.dtype), kernel.reshape(kernel_shape).astype(self.dtype))
        if self.use_bias:  # the output's last axis is `features`
            y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class SelfAttention(nn.Module):
    """Multi-head self-attention; keys have no bias; optional l2-normalised q/k."""

    embed_dim: int
    num_heads: int
    attn_l2_norm: bool
    init_std: float
    proj_scale: float
    dtype: Any = jnp.float32
    attention: str = 'auto'

    @nn.compact
    def __call__(self, x, sizes=None, past_kv=None):
        """x (B, N, C) -> ((B, N, C), (k, v) of x or None).

        Without `past_kv`, block-causal attention over x itself with blocks of `sizes` tokens (static).
        With past_kv = (k, v) of the P earlier tokens (the sampler's cache: (B, H, P, hd), or (B, H, hd, P)
        where attention.sequence_minor()), x's queries attend to all of them and to x (one scale: no
        mask needed), and the cache grown by x's k, v (P + N tokens) is returned.
        """
        B, N, C = x.shape
        H = self.num_heads
        hd = C // H
        pad = 0 if past_kv is not None else attn_lib.padding(N, self.attention, self.dtype)
        if pad:  # appended as one more block: no real query sees it
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
            sizes = tuple(sizes) + (pad,)
        # Head-major (B, H, N, hd), or on TPU sequence-minor (B, H, hd, N): see attention.sequence_minor.
        seq_minor = attn_lib.sequence_minor()
        spec, d = ('bnc,cthd->tbhdn', -2) if seq_minor else ('bnc,cthd->tbhnd', -1)  # d: the head dim's axis
        n = attn_lib.token_axis(seq_minor)
        q, k, v = ReshapedDense(C, 3 * C, trunc_normal(self.init_std), False, self.dtype, name='mat_qkv')(
            x, spec, (C, 3, H, hd)
        )
        per_head = lambda b: jnp.expand_dims(b.reshape(H, hd), n).astype(self.dtype)
        q = q + per_head(self.param('q_bias', nn.initializers.zeros, (C,)))
        v = v + per_head(self.param('v_bias', nn.initializers.zeros, (C,)))
        if self.attn_l2_norm:
            scale_mul = self.param('scale_mul', nn.initializers.constant(math.log(4.0)), (H,))
            temp = jnp.exp(jnp.minimum(scale_mul, MAX_LOG_SCALE_MUL))
            q = _l2_normalize(q, axis=d) * temp[:, None, None].astype(q.dtype)
            k = _l2_normalize(k, axis=d)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(hd)
        new_kv = None
        if past_kv is None:
            out = attn_lib.attend(q, k, v, sizes=sizes, scale=scale, implementation=self.attention, seq_minor=seq_minor)
        else:  # the cache grown by this scale is what attention reads and what goes on
            k, v = (jnp.concatenate([past.astype(t.dtype), t], axis=n) for past, t in zip(past_kv, (k, v)))
            out = attn_lib.attend_cached(q, k, v, scale=scale, implementation=self.attention, seq_minor=seq_minor)
            new_kv = (k, v)
        out = ReshapedDense(C, C, trunc_normal(self.init_std, self.proj_scale), True, self.dtype, name='proj')(
            out, 'bhnd,hdc->bnc', (H, hd, C)
        )
        return out[:, :N], new_kv


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
        return nn.Dense(C, dtype=self.dtype, kernel_init=trunc_normal(self.init_std, self.proj_scale), name='fc2')(h)


def _adaln_column_scale(C: int, n: int, init_adaln: float, init_adaln_gamma: float):
    """Init multipliers of the 6 AdaLN chunks (gamma1, gamma2, scale1, scale2, shift1, shift2)."""
    return np.repeat(np.array([init_adaln_gamma] * 2 + [init_adaln] * (n - 2)), C)


class AdaLNSelfAttn(nn.Module):
    """x += gamma1 * Attn(LN(x)(1+scale1)+shift1); x += gamma2 * FFN(LN(x)(1+scale2)+shift2).

    Its call has the form of a scan body over the blocks (see `VAR.setup`).
    """

    embed_dim: int
    num_heads: int
    mlp_ratio: float
    norm_eps: float
    attn_l2_norm: bool
    shared_aln: bool
    drop_path: bool  # whether any block has drop path (the per-block rate is an argument)
    init_std: float
    depth: int
    init_adaln: float
    init_adaln_gamma: float
    dtype: Any = jnp.float32
    attention: str = 'auto'
    modulation_dtype: Any = jnp.float32  # of LN(x)(1+scale)+shift and the gammas ('official': float32)

    @nn.compact
    def __call__(self, x, drop_rate, past_kv, cond_or_gss, train: bool = False, sizes=None):
        """(x (B, N, C), the new k, v or None).

        drop_rate: this block's drop-path rate (scalar); past_kv: None, or the sampler's cached (k, v) of
        earlier tokens (see SelfAttention); cond_or_gss: (B, C) class condition, or with shared AdaLN the
        shared (B, 6, C) output; sizes: token counts of the scales in x (teacher forcing).
        """
        C = self.embed_dim
        if self.shared_aln:

            def gss_init(key, shape, dtype=jnp.float32):
                mult = _adaln_column_scale(1, 6, self.init_adaln, self.init_adaln_gamma)[:, None]
                return (jax.random.normal(key, shape) / math.sqrt(C) * mult).astype(dtype)

            ada = self.param('ada_gss', gss_init, (6, C)) + cond_or_gss
        else:
            ada = nn.Dense(
                6 * C,
                dtype=self.dtype,
                name='ada_lin',
                kernel_init=trunc_normal(
                    self.init_std, _adaln_column_scale(C, 6, self.init_adaln, self.init_adaln_gamma)
                ),
            )(nn.silu(cond_or_gss)).reshape(-1, 6, C)
        ada = ada[:, None].astype(self.modulation_dtype)  # (B, 1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada[:, :, i] for i in range(6))
        proj_scale = 1.0 / math.sqrt(2 * self.depth)

        h, new_kv = SelfAttention(
            C, self.num_heads, self.attn_l2_norm, self.init_std, proj_scale, self.dtype, self.attention, name='attn'
        )(_layer_norm(x, self.norm_eps) * (1 + scale1) + shift1, sizes, past_kv)
        x = x + self._drop_path(h * gamma1, drop_rate, train)
        h = FFN(round(C * self.mlp_ratio), self.init_std, proj_scale, self.dtype, name='ffn')(
            _layer_norm(x, self.norm_eps) * (1 + scale2) + shift2
        )
        x = x + self._drop_path(h * gamma2, drop_rate, train)
        return x, new_kv

    def _drop_path(self, x, rate, train):
        """Per-sample stochastic depth (timm DropPath), training only."""
        if not train or not self.drop_path:
            return x
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * mask.astype(x.dtype) / keep.astype(x.dtype)


class Head(nn.Module):
    """The vocabulary projection (nn.Dense's params: kernel (C, V), bias (V,)) in the dtype the caller asks
    for, accumulated in float32: float32 logits for sampling, the blocks' dtype for the training loss."""

    features: int
    kernel_init: Callable

    @nn.compact
    def __call__(self, x, dtype, out_dtype=None):
        kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features))
        bias = self.param('bias', nn.initializers.zeros, (self.features,))
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
        return (y + bias).astype(out_dtype or dtype)


class AdaLNBeforeHead(nn.Module):
    embed_dim: int
    norm_eps: float
    init_std: float
    init_adaln: float

    @nn.compact
    def __call__(self, x, cond):
        C = self.embed_dim
        ada = nn.Dense(2 * C, name='ada_lin', kernel_init=trunc_normal(self.init_std, self.init_adaln))(
            nn.silu(cond)
        ).reshape(-1, 1, 2, C)
        scale, shift = ada[:, :, 0], ada[:, :, 1]
        return _layer_norm(x, self.norm_eps) * (1 + scale) + shift


PRECISIONS = ('official', 'lean')


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer.

    Defaults are VAR-d16 at 256 px; `var_config_for_depth` builds the official family.
    `dtype` is the compute dtype of the blocks (params stay float32) and of the training logits; the
    sampler's logits are float32.
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
    patch_nums: Sequence[int] = PATCH_NUMS_256
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0
    dtype: Any = jnp.float32
    # Where a low-precision dtype rounds: 'official' (the official fp16 autocast recipe's layout) keeps the residual
    # stream, the AdaLN modulation LN(x)(1+scale)+shift, the gammas and the training logits in float32 and runs
    # the blocks' matmuls in `dtype`; 'lean' also rounds those to `dtype` (less memory). Same params.
    precision: str = 'official'
    # How the blocks run; none of these changes the params or the math (only speed and memory).
    scan: Any = None  # True: one nn.scan over the blocks (compile time independent of depth); False:
    #                            unrolled (faster on CPU); None: scan on TPU / GPU, unrolled on CPU
    remat: str = 'none'  # per block: 'none', 'dots' (keep matmul outputs, recompute the rest),
    #                            'dots_except_fc1' (also recompute the MLP's 4C-wide hidden: less memory), 'full'
    attention: str = 'auto'  # 'auto', 'xla', 'splash' (TPU), 'cudnn' (GPU): see var_jax.models.attention

    def setup(self):
        pns = validate_patch_nums(self.patch_nums)
        C = self.embed_dim
        if C % self.num_heads:
            raise ValueError(
                f'embed_dim {C} is not divisible by num_heads {self.num_heads}; '
                f'choose a width that is a multiple of the number of heads'
            )
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
        fc1_kernel_shape = (C, round(C * self.mlp_ratio))
        remat_policy(self.remat, fc1_kernel_shape)
        attn_lib.resolve(self.attention, self.dtype)  # a bad name fails here, not deep in a trace
        if self.precision not in PRECISIONS:
            raise ValueError(f'var.precision={self.precision!r}: use one of {PRECISIONS}')
        scan = self.scan if self.scan is not None else target_platform() != 'cpu'
        self.blocks = stacked_blocks(AdaLNSelfAttn, self.depth, scan, self.remat, fc1_kernel_shape)(
            C,
            self.num_heads,
            self.mlp_ratio,
            self.norm_eps,
            self.attn_l2_norm,
            self.shared_aln,
            self.drop_path_rate > 0,
            std,
            self.depth,
            self.init_adaln,
            self.init_adaln_gamma,
            self.dtype,
            self.attention,
            self._wide_dtype,
            name=BLOCKS,
        )
        self.head_nm = AdaLNBeforeHead(C, self.norm_eps, std, self.init_adaln)
        self.head = Head(self.vocab_size, trunc_normal(std, self.init_head))

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

    @property
    def _wide_dtype(self):
        """The dtype of the residual stream, the modulation and the training logits (see `precision`)."""
        return jnp.float32 if self.precision == 'official' else self.dtype

    def logits(self, h, cond, dtype=jnp.float32, out_dtype=None):
        """Head: AdaLN in float32, then the vocabulary projection computed in `dtype` (accumulated in float32) and
        returned in `out_dtype` (default `dtype`).

        The sampler asks for float32 logits. Training computes in the blocks' dtype and returns float32 logits
        ('official': the official loss takes them in float32) or, 'lean', the blocks' dtype: the (B, L, V) logits
        and their gradient are then half the bytes; the loss upcasts them inside its fused reductions.
        """
        return self.head(self.head_nm(h.astype(jnp.float32), cond), dtype, out_dtype)

    # --- teacher forcing ---------------------------------------------------------------------
    def __call__(self, labels, x_wo_first, train: bool = False):
        """Teacher-forced logits (B, L, V).

        labels: (B,) int in [0, num_classes); x_wo_first: (B, L - pn_0^2, Cvae), the quantizer's
        `idx_to_var_input`. In training mode labels are replaced by the null class with
        probability cond_drop_rate and drop path is active (rng stream 'dropout'). Unlike the
        official forward, evaluation mode never drops labels.

        x_wo_first may stop at the end of an earlier scale (progressive training): the logits then
        cover only those tokens, (B, end, V), exactly as the official forward with prog_si >= 0.
        """
        if train and self.cond_drop_rate > 0:
            drop = jax.random.uniform(self.make_rng('dropout'), labels.shape) < self.cond_drop_rate
            labels = jnp.where(drop, self.num_classes, labels)
        cond = self.cond(labels)
        first = self.begin_ends[0][1]
        end = first + x_wo_first.shape[1]
        if end not in [e for _, e in self.begin_ends]:
            raise ValueError(
                f'x_wo_first has {x_wo_first.shape[1]} tokens; it must end at a scale boundary '
                f'(scale ends {[e for _, e in self.begin_ends]}, minus the first scale)'
            )
        x = jnp.concatenate(
            [self.start_tokens(cond), self.word_embed(x_wo_first.astype(jnp.float32)) + self.lvl_pos(first, end)[None]],
            axis=1,
        )
        sizes = tuple(e - b for b, e in self.begin_ends if e <= end)
        h, _ = self.blocks(x.astype(self._wide_dtype), self._drop_rates(), None, self._cond_or_gss(cond), train, sizes)
        return self.logits(h, cond, self.dtype, self._wide_dtype)

    def _drop_rates(self):
        """Per-block drop-path rates, linearly from 0 to drop_path_rate (official)."""
        return jnp.asarray(np.linspace(0, self.drop_path_rate, self.depth), jnp.float32)

    # --- cached autoregressive step ----------------------------------------------------------
    def init_cache(self, batch: int):
        """The empty KV cache {'k', 'v'}, stacked over the blocks: (depth, batch, H, 0, hd), or sequence-minor
        (depth, batch, H, hd, 0) where attention.sequence_minor() (on TPU). Each `step` returns it grown by
        its scale: no cache-sized buffer is zero-filled, sliced or updated in place."""
        H, hd = self.num_heads, self.embed_dim // self.num_heads
        shape = (self.depth, batch, H) + ((hd, 0) if attn_lib.sequence_minor() else (0, hd))
        return {'k': jnp.zeros(shape, self.dtype), 'v': jnp.zeros(shape, self.dtype)}

    def step(self, si: int, tokens, cond, cache):
        """One scale of autoregressive inference: (logits (B, pn^2, V), the cache grown by this scale).

        tokens: scale si's input (B, pn_si^2, C) from `start_tokens` or `scale_tokens`; the
        cache holds keys/values of all coarser scales (`init_cache`, then each step's).
        """
        begin, _ = self.begin_ends[si]
        held = cache['k'].shape[attn_lib.token_axis(attn_lib.sequence_minor())]
        if held != begin:
            raise ValueError(
                f'scale {si} needs the cache of the {begin} tokens before it, got {held}: call step '
                f'for the scales in order, starting from init_cache'
            )
        h, (k, v) = self.blocks(
            tokens.astype(self._wide_dtype),
            self._drop_rates(),
            (cache['k'], cache['v']),
            self._cond_or_gss(cond),
            False,
            None,
        )
        return self.logits(h, cond), {'k': k, 'v': v}


def var_config_for_depth(depth: int, *, shared_aln: bool = False, **overrides) -> dict:
    """Constructor arguments of the official VAR-d<depth>: width 64*d, d heads, drop path 0.1*d/24.

    d36 is the 512-px model with shared AdaLN; pass patch_nums=(1,2,3,4,6,9,13,18,24,32) and
    shared_aln=True for it.
    """
    cfg = dict(
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        drop_path_rate=0.1 * depth / 24,
        shared_aln=shared_aln,
        attn_l2_norm=True,
        norm_eps=1e-6,
        cond_drop_rate=0.1,
    )
    cfg.update(overrides)
    return cfg
