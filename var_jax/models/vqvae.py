"""The multi-scale VQVAE tokenizer of VAR (official models/vqvae.py, basic_vae.py): encoder, quantizer, decoder.

The encoder and decoder are the LDM/VQGAN convolutional stacks (GroupNorm(32, eps 1e-6),
SiLU, self-attention at the lowest resolution). Submodule names follow the official state
dict ('down.2.block.0' -> 'down_2_block_0') so the converter is a renaming plus layout changes.
Images are NHWC in [-1, 1]. Every conv and matmul takes an explicit `precision`: the encoding path
(encoder, quant_conv, quantizer) runs at VQVAE.encode_precision, the decoding path at decode_precision.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from var_jax.models.quantizer import PATCH_NUMS_256, MultiScaleQuantizer, matmul_precision, validate_patch_nums

Precision = Optional[jax.lax.Precision]  # None: the backend's default (or jax_default_matmul_precision)


def decode_dtype(name: str, field: str = 'decode_dtype'):
    """'float32' | 'bfloat16' -> the compute dtype of the decoding path (VQVAE.decode_dtype)."""
    if name not in ('float32', 'bfloat16'):
        raise ValueError(f"{field}={name!r}: use 'float32' or 'bfloat16'")
    return jnp.dtype(name)


def _group_norm(name, dtype=jnp.float32):
    # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-E[x]^2. Statistics in float32 whatever dtype.
    return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    out_channels: int
    precision: Precision = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        def conv(k, name):
            return nn.Conv(
                self.out_channels, (k, k), padding=k // 2, precision=self.precision, dtype=self.dtype, name=name
            )

        h = conv(3, 'conv1')(nn.silu(_group_norm('norm1', self.dtype)(x)))
        h = conv(3, 'conv2')(nn.silu(_group_norm('norm2', self.dtype)(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(1, 'nin_shortcut')(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions, scale C^-0.5.

    Two einsums rather than jax.nn.dot_product_attention, which takes no precision.
    """

    precision: Precision = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        qkv = nn.Conv(3 * C, (1, 1), precision=self.precision, dtype=self.dtype, name='qkv')(
            _group_norm('norm', self.dtype)(x)
        )
        q, k, v = jnp.split(qkv.reshape(B, H * W, 3 * C), 3, axis=-1)
        logits = jnp.einsum('bqc,bkc->bqk', q, k, precision=self.precision, preferred_element_type=jnp.float32)
        w = jax.nn.softmax(logits * C**-0.5, axis=-1).astype(self.dtype)
        h = jnp.einsum('bqk,bkc->bqc', w, v, precision=self.precision)
        return x + nn.Conv(C, (1, 1), precision=self.precision, dtype=self.dtype, name='proj_out')(
            h.reshape(B, H, W, C)
        )


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding only right and bottom (the official asymmetric pad)."""

    precision: Precision = None

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x.shape[-1], (3, 3), strides=2, padding='VALID', precision=self.precision, name='conv')(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    precision: Precision = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(x.shape[-1], (3, 3), padding=1, precision=self.precision, dtype=self.dtype, name='conv')(x)


class Encoder(nn.Module):
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    z_channels: int
    using_sa: bool = True
    using_mid_sa: bool = True
    precision: Precision = None

    @nn.compact
    def __call__(self, x):
        p = self.precision
        h = nn.Conv(self.ch, (3, 3), padding=1, precision=p, name='conv_in')(x)
        last = len(self.ch_mult) - 1
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, p, name=f'down_{i}_block_{j}')(h)
                if i == last and self.using_sa:
                    h = AttnBlock(p, name=f'down_{i}_attn_{j}')(h)
            if i != last:
                h = Downsample(p, name=f'down_{i}_downsample')(h)
        c = h.shape[-1]
        h = ResnetBlock(c, p, name='mid_block_1')(h)
        if self.using_mid_sa:
            h = AttnBlock(p, name='mid_attn_1')(h)
        h = ResnetBlock(c, p, name='mid_block_2')(h)
        h = nn.silu(_group_norm('norm_out')(h))
        return nn.Conv(self.z_channels, (3, 3), padding=1, precision=p, name='conv_out')(h)


class Decoder(nn.Module):
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    precision: Precision = None
    dtype: Any = jnp.float32  # compute dtype (params stay float32); the images come out float32

    @nn.compact
    def __call__(self, z):
        p, dt = self.precision, self.dtype
        last = len(self.ch_mult) - 1
        c = self.ch * self.ch_mult[last]
        h = nn.Conv(c, (3, 3), padding=1, precision=p, dtype=dt, name='conv_in')(z)
        h = ResnetBlock(c, p, dt, name='mid_block_1')(h)
        if self.using_mid_sa:
            h = AttnBlock(p, dt, name='mid_attn_1')(h)
        h = ResnetBlock(c, p, dt, name='mid_block_2')(h)
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = ResnetBlock(self.ch * self.ch_mult[i], p, dt, name=f'up_{i}_block_{j}')(h)
                if i == last and self.using_sa:
                    h = AttnBlock(p, dt, name=f'up_{i}_attn_{j}')(h)
            if i != 0:
                h = Upsample(p, dt, name=f'up_{i}_upsample')(h)
        h = nn.silu(_group_norm('norm_out', dt)(h))
        return nn.Conv(self.out_channels, (3, 3), padding=1, precision=p, dtype=dt, name='conv_out')(h).astype(
            jnp.float32
        )


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder.

    Defaults are the released tokenizer vae_ch160v4096z32 (the official constructor hard-codes
    ch_mult (1, 1, 2, 2, 4); here it is a field). The latent side is image_size / 2^(len(ch_mult)-1)
    and must equal patch_nums[-1].

    encode_precision / decode_precision ('highest' | 'high' | 'default'): the matmul precision of the
    encoding path (encoder, quant_conv and the quantizer: its phi convs, resizes and nearest-code search,
    which also build the transformer's input) and of the decoding path (post_quant_conv, decoder). They
    choose how the math runs, not the params. On TPU (and with TF32 on GPU) float32 convs at 'default' run
    as one bfloat16 pass, which flips nearest-code argmins, so token ids match the float32 reference only
    at 'highest'; the decoder makes pixels, which the official sampler computes in float16 anyway.
    decode_dtype ('float32' | 'bfloat16'): the compute dtype of the decoding path (params stay float32). On
    accelerators bfloat16 halves the decoder's activation traffic and temporaries.
    """

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    patch_nums: Sequence[int] = PATCH_NUMS_256
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    quant_conv_ks: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    encode_precision: str = 'highest'
    decode_precision: str = 'default'
    decode_dtype: str = 'float32'

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return validate_patch_nums(self.patch_nums)[-1] * self.downsample

    def setup(self):
        if self.ch % 32 or any(self.ch * m % 32 for m in self.ch_mult):
            raise ValueError(
                f'every encoder/decoder width ch*ch_mult must be a multiple of 32 (GroupNorm '
                f'with 32 groups); got ch={self.ch}, ch_mult={tuple(self.ch_mult)}'
            )
        enc = matmul_precision(self.encode_precision, 'encode_precision')
        dec = matmul_precision(self.decode_precision, 'decode_precision')
        arch = dict(
            ch=self.ch,
            ch_mult=tuple(self.ch_mult),
            num_res_blocks=self.num_res_blocks,
            using_sa=self.using_sa,
            using_mid_sa=self.using_mid_sa,
        )
        self.encoder = Encoder(z_channels=self.z_channels, precision=enc, **arch)
        dec_dtype = decode_dtype(self.decode_dtype)
        self.decoder = Decoder(precision=dec, dtype=dec_dtype, **arch)
        ks = self.quant_conv_ks
        self.quant_conv = nn.Conv(self.z_channels, (ks, ks), padding=ks // 2, precision=enc)
        self.post_quant_conv = nn.Conv(self.z_channels, (ks, ks), padding=ks // 2, precision=dec, dtype=dec_dtype)
        self.quantize = MultiScaleQuantizer(
            vocab_size=self.vocab_size,
            cvae=self.z_channels,
            patch_nums=tuple(self.patch_nums),
            beta=self.beta,
            quant_resi=self.quant_resi,
            share_quant_resi=self.share_quant_resi,
            precision=enc,
        )

    def _check_images(self, img):
        R = self.image_size
        if img.ndim != 4 or img.shape[1:] != (R, R, 3):
            raise ValueError(
                f'images must be (B, {R}, {R}, 3) NHWC for this tokenizer (patch_nums '
                f'{tuple(self.patch_nums)}, downsample {self.downsample}), got {img.shape}'
            )

    def img_to_f(self, img):
        """Images (B, R, R, 3) in [-1, 1] -> latent f (B, R/ds, R/ds, Cvae) = quant_conv(encoder(img))."""
        self._check_images(img)
        return self.quant_conv(self.encoder(img))

    def img_to_idx(self, img):
        """Images -> per-scale token indices [(B, pn^2) int32], coarse to fine."""
        return self.quantize.f_to_idx(self.img_to_f(img))

    def fhat_to_img(self, f_hat, clamp: bool = True):
        """f_hat (B, h, w, Cvae) -> images (B, R, R, 3), clamped to [-1, 1] unless clamp=False."""
        img = self.decoder(self.post_quant_conv(f_hat))
        return jnp.clip(img, -1, 1) if clamp else img

    def idx_to_img(self, idx_list):
        """Per-scale indices -> images in [-1, 1]."""
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list))

    def idx_to_var_input(self, idx_list):
        """Teacher-forcing input of the transformer (B, L - 1, Cvae); see the quantizer."""
        return self.quantize.idx_to_var_input(idx_list)

    def next_autoregressive_input(self, si, f_hat, h):
        return self.quantize.next_autoregressive_input(si, f_hat, h)

    def __call__(self, img):
        """Training forward: (reconstruction (unclamped), vq_loss, per-scale code hits (S, V), latent f)."""
        f = self.img_to_f(img)
        f_hat, vq_loss, hits = self.quantize(f)
        return self.fhat_to_img(f_hat, clamp=False), vq_loss, hits, f
