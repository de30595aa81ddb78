"""PatchGAN discriminator for optional adversarial tokenizer training (pix2pix / taming design).

Layout (all convolutions 4x4 with padding 1, LeakyReLU slope 0.2):

    conv stride 2 -> ndf channels, LeakyReLU                        (no normalization)
    n_layers - 1 x [conv stride 2 -> ndf * min(2^i, 8), norm, LeakyReLU]   i = 1 .. n_layers-1
    conv stride 1 -> ndf * min(2^n_layers, 8), norm, LeakyReLU
    conv stride 1 -> 1 channel: one real/fake logit per image patch

For 32 px inputs with n_layers=3 the logits are a (B, 2, 2, 1) patch grid (256 px: 30 x 30).

Normalization is GroupNorm instead of the BatchNorm of pix2pix / taming: BatchNorm keeps running
statistics, a mutable 'batch_stats' collection that would have to be threaded through the pure
train step, sharded and checkpointed, and whose train/eval behaviour depends on the batch (and on
how it is split across devices). GroupNorm normalizes each example on its own, so the
discriminator is a plain function of (params, images). Like taming's BatchNorm layers the
normalized convolutions have no bias (the norm's shift plays that role).
"""

import math

import flax.linen as nn
import jax.numpy as jnp

_conv_init = nn.initializers.normal(0.02)  # taming's weights_init: N(0, 0.02) conv weights


def _patch_side(side: int, n_layers: int) -> int:
    """Side of the logit grid for `side`-pixel inputs."""
    for _ in range(n_layers):
        side = (side - 2) // 2 + 1
    return side - 2


def _norm(channels: int, name: str):
    return nn.GroupNorm(num_groups=math.gcd(32, channels), epsilon=1e-5, name=name)


class PatchDiscriminator(nn.Module):
    """NLayerDiscriminator: NHWC images in [-1, 1] -> (B, h, w, 1) patch logits."""

    ndf: int = 64
    n_layers: int = 3

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f'PatchDiscriminator takes NHWC RGB images, got shape {x.shape}')
        side = min(x.shape[1], x.shape[2])
        if _patch_side(side, self.n_layers) < 1:
            fits = [n for n in range(1, self.n_layers) if _patch_side(side, n) >= 1]
            raise ValueError(
                f'{side} px images are too small for a discriminator with n_layers={self.n_layers}; '
                f'set tokenizer.disc_layers to at most {max(fits, default=0)}'
            )
        conv = lambda c, stride, name, bias=True: nn.Conv(
            c, (4, 4), strides=stride, padding=1, use_bias=bias, kernel_init=_conv_init, name=name
        )
        h = nn.leaky_relu(conv(self.ndf, 2, 'conv_0')(x), 0.2)
        for i in range(1, self.n_layers):
            c = self.ndf * min(2**i, 8)
            h = nn.leaky_relu(_norm(c, f'norm_{i}')(conv(c, 2, f'conv_{i}', bias=False)(h)), 0.2)
        c = self.ndf * min(2**self.n_layers, 8)
        h = nn.leaky_relu(_norm(c, f'norm_{self.n_layers}')(conv(c, 1, f'conv_{self.n_layers}', bias=False)(h)), 0.2)
        return conv(1, 1, 'conv_out')(h).astype(jnp.float32)
