"""The multi-scale VQVAE tokenizer of VAR (VAR_SPEC 1): encoder, quantizer, decoder.

The encoder and decoder are the LDM/VQGAN convolutional stacks (GroupNorm(32, eps 1e-6),
SiLU, self-attention at the lowest resolution). Submodule names follow the official state
dict ('down.2.block.0' -> 'down_2_block_0') so the converter is a renaming plus layout changes.
Images are NHWC in [-1, 1].
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from var_jax.models.quantizer import MultiScaleQuantizer, validate_patch_nums


def _group_norm(name):
    # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-E[x]^2.
    return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    out_channels: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.out_channels, (3, 3), padding=1, name='conv1')(nn.silu(_group_norm('norm1')(x)))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, name='conv2')(nn.silu(_group_norm('norm2')(h)))
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name='nin_shortcut')(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions, scale C^-0.5."""

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        qkv = nn.Conv(3 * C, (1, 1), name='qkv')(_group_norm('norm')(x)).reshape(B, H * W, 3, 1, C)
        h = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=C ** -0.5)
        return x + nn.Conv(C, (1, 1), name='proj_out')(h.reshape(B, H, W, C))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding only right and bottom (the official asymmetric pad)."""

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x.shape[-1], (3, 3), strides=2, padding='VALID', name='conv')(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(x.shape[-1], (3, 3), padding=1, name='conv')(x)


class Encoder(nn.Module):
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    z_channels: int
    using_sa: bool = True
    using_mid_sa: bool = True

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.ch, (3, 3), padding=1, name='conv_in')(x)
        last = len(self.ch_mult) - 1
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, name=f'down_{i}_block_{j}')(h)
                if i == last and self.using_sa:
                    h = AttnBlock(name=f'down_{i}_attn_{j}')(h)
            if i != last:
                h = Downsample(name=f'down_{i}_downsample')(h)
        c = h.shape[-1]
        h = ResnetBlock(c, name='mid_block_1')(h)
        if self.using_mid_sa:
            h = AttnBlock(name='mid_attn_1')(h)
        h = ResnetBlock(c, name='mid_block_2')(h)
        h = nn.silu(_group_norm('norm_out')(h))
        return nn.Conv(self.z_channels, (3, 3), padding=1, name='conv_out')(h)


class Decoder(nn.Module):
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True

    @nn.compact
    def __call__(self, z):
        last = len(self.ch_mult) - 1
        c = self.ch * self.ch_mult[last]
        h = nn.Conv(c, (3, 3), padding=1, name='conv_in')(z)
        h = ResnetBlock(c, name='mid_block_1')(h)
        if self.using_mid_sa:
            h = AttnBlock(name='mid_attn_1')(h)
        h = ResnetBlock(c, name='mid_block_2')(h)
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks + 1):
                h = ResnetBlock(self.ch * self.ch_mult[i], name=f'up_{i}_block_{j}')(h)
                if i == last and self.using_sa:
                    h = AttnBlock(name=f'up_{i}_attn_{j}')(h)
            if i != 0:
                h = Upsample(name=f'up_{i}_upsample')(h)
        h = nn.silu(_group_norm('norm_out')(h))
        return nn.Conv(self.out_channels, (3, 3), padding=1, name='conv_out')(h)


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder.

    Defaults are the released tokenizer vae_ch160v4096z32 (the official constructor hard-codes
    ch_mult (1, 1, 2, 2, 4); here it is a field). The latent side is image_size / 2^(len(ch_mult)-1)
    and must equal patch_nums[-1].
    """
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    quant_conv_ks: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return validate_patch_nums(self.patch_nums)[-1] * self.downsample

    def setup(self):
        if self.ch % 32 or any(self.ch * m % 32 for m in self.ch_mult):
            raise ValueError(f'every encoder/decoder width ch*ch_mult must be a multiple of 32 (GroupNorm '
                             f'with 32 groups); got ch={self.ch}, ch_mult={tuple(self.ch_mult)}')
        arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    using_sa=self.using_sa, using_mid_sa=self.using_mid_sa)
        self.encoder = Encoder(z_channels=self.z_channels, **arch)
        self.decoder = Decoder(**arch)
        ks = self.quant_conv_ks
        self.quant_conv = nn.Conv(self.z_channels, (ks, ks), padding=ks // 2)
        self.post_quant_conv = nn.Conv(self.z_channels, (ks, ks), padding=ks // 2)
        self.quantize = MultiScaleQuantizer(
            vocab_size=self.vocab_size, cvae=self.z_channels, patch_nums=tuple(self.patch_nums),
            beta=self.beta, quant_resi=self.quant_resi, share_quant_resi=self.share_quant_resi)

    def _check_images(self, img):
        R = self.image_size
        if img.ndim != 4 or img.shape[1:] != (R, R, 3):
            raise ValueError(f'images must be (B, {R}, {R}, 3) NHWC for this tokenizer (patch_nums '
                             f'{tuple(self.patch_nums)}, downsample {self.downsample}), got {img.shape}')

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
