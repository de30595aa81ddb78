"""LPIPS-VGG perceptual distance (Zhang et al., CVPR 2018), the perceptual loss of VQGAN tokenizers.

    d(x, y) = sum_k mean_hw  lin_k( (n(f_k(s(x))) - n(f_k(s(y))))^2 )

s: the LPIPS scaling layer, (x - shift) / scale with shift (-.030, -.088, -.188) and scale
(.458, .448, .450), for images in [-1, 1]. f_k: torchvision's VGG16 `features` (3x3 convs with
padding 1 and ReLU, a 2x2 stride-2 max-pool between the five blocks) tapped after relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3. n: unit length over channels, x / (||x|| + 1e-10).
lin_k: a 1x1 convolution without bias to one channel (the learned LPIPS v0.1 weights).
Images are NHWC; the distance is per image, (B,). Sides of at least 16 px (relu5_3 is 1/16).

The weights are never downloaded. They come from two local files, torchvision's ImageNet VGG16
state dict and the LPIPS linear layers of the lpips package (see WHERE_TO_GET), converted once into
one .npz (torch is needed only for that), which `load_lpips_params(path)` reads:

    python -m var_jax.convert --lpips_vgg16 vgg16-397923af.pth --lpips_lin vgg.pth --out lpips_vgg.npz
"""

import os
from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from var_jax.errors import MissingFileError, UserError

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
BLOCKS = (2, 2, 3, 3, 3)  # 3x3 convs per VGG16 block; a tap after each block's last ReLU
WIDTHS = (64, 128, 256, 512, 512)  # channels of the blocks (= of the five taps)
MIN_SIDE = 2 ** (len(BLOCKS) - 1)  # four max-pools: relu5_3 is side // 16

VGG16_FILE = 'vgg16-397923af.pth'  # torchvision's name of its ImageNet VGG16 weights
LIN_FILE = 'vgg.pth'  # the lpips package's name of its VGG linear layers
WHERE_TO_GET = (
    f"{VGG16_FILE} is torchvision's ImageNet VGG16 state dict "
    f'(https://download.pytorch.org/models/{VGG16_FILE}, also cached by torchvision.models.vgg16(weights=...) '
    f'in ~/.cache/torch/hub/checkpoints/); {LIN_FILE} holds the LPIPS linear layers of the lpips package '
    f'(lpips/weights/v0.1/{LIN_FILE} in a `pip install lpips` or in github.com/richzhang/PerceptualSimilarity). '
    f'Convert them once with python -m var_jax.convert --lpips_vgg16 {VGG16_FILE} --lpips_lin {LIN_FILE} '
    f'--out lpips_vgg.npz'
)


class LPIPSWeightsError(UserError):
    """A weights file that does not hold what LPIPS-VGG needs."""


def _convs():
    """(our name, torchvision `features` index, in channels, out channels) of the 13 VGG16 convs.

    torchvision's `features` is [conv, ReLU] * n per block with a max-pool after every block.
    """
    out, index, cin = [], 0, 3
    for b, (n, width) in enumerate(zip(BLOCKS, WIDTHS)):
        for j in range(n):
            out.append((f'conv{b + 1}_{j + 1}', index, cin, width))
            index, cin = index + 2, width
        index += 1
    return out


def vgg16_torch_shapes() -> dict:
    """{torchvision key: shape} of the VGG16 tensors LPIPS uses (the classifier is not used)."""
    shapes = {}
    for _, i, cin, cout in _convs():
        shapes[f'features.{i}.weight'] = (cout, cin, 3, 3)
        shapes[f'features.{i}.bias'] = (cout,)
    return shapes


def lin_torch_shapes() -> dict:
    """{lpips key: shape} of the five linear layers (nn.Sequential(Dropout, Conv2d): index 1)."""
    return {f'lin{k}.model.1.weight': (1, c, 1, 1) for k, c in enumerate(WIDTHS)}


def _unit_normalize(x, eps=1e-10):
    """x / (||x||_channels + eps). The floor under the sum of squares (its root is 1e-18, far below
    eps, so values do not change) keeps the gradient finite where a feature vector is all zero."""
    return x / (jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-36)) + eps)


class VGG16Features(nn.Module):
    """torchvision VGG16 `features` up to relu5_3; returns the five LPIPS taps (NHWC)."""

    @nn.compact
    def __call__(self, x):
        taps = []
        convs = iter(_convs())
        for b, n in enumerate(BLOCKS):
            if b:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for _ in range(n):
                name, _, _, width = next(convs)
                x = nn.relu(nn.Conv(width, (3, 3), padding=1, name=name)(x))
            taps.append(x)
        return taps


class LPIPS(nn.Module):
    """LPIPS-VGG distance of two NHWC image batches in [-1, 1] -> (B,). Params: `load_lpips_params`."""

    @nn.compact
    def __call__(self, x, y):
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f'LPIPS takes two NHWC RGB batches of one shape, got {x.shape} and {y.shape}')
        if min(x.shape[1:3]) < MIN_SIDE:
            raise ValueError(
                f'LPIPS-VGG needs images of at least {MIN_SIDE} px (VGG16 pools four times), '
                f'got {x.shape[1]}x{x.shape[2]}'
            )
        vgg = VGG16Features(name='vgg')
        scale = lambda v: (v - jnp.asarray(SHIFT, v.dtype)) / jnp.asarray(SCALE, v.dtype)
        total = 0.0
        for k, (fx, fy) in enumerate(zip(vgg(scale(x)), vgg(scale(y)))):
            diff = jnp.square(_unit_normalize(fx) - _unit_normalize(fy))
            total = total + jnp.mean(nn.Conv(1, (1, 1), use_bias=False, name=f'lin{k}')(diff), axis=(1, 2, 3))
        return total


# --- weights ------------------------------------------------------------------------------------
def check_tensors(state_dict: Mapping, shapes: dict, source: str) -> None:
    missing = [k for k in shapes if k not in state_dict]
    misshaped = [
        f'{k}: file {tuple(np.shape(state_dict[k]))}, expected {shapes[k]}'
        for k in shapes
        if k in state_dict and tuple(np.shape(state_dict[k])) != shapes[k]
    ]
    if missing or misshaped:
        lines = [f'{source} does not hold the LPIPS-VGG weights:']
        if missing:
            lines.append(f'  {len(missing)} missing: ' + ', '.join(missing[:8]) + (' ...' if len(missing) > 8 else ''))
        if misshaped:
            lines.append(f'  {len(misshaped)} mis-shaped: ' + '; '.join(misshaped))
        lines.append(WHERE_TO_GET)
        raise LPIPSWeightsError('\n'.join(lines))


def state_dict_to_params(state_dict: Mapping[str, np.ndarray]) -> dict:
    """torch-keyed tensors (torchvision VGG16 `features.*` + lpips `lin*`) -> LPIPS params.

    Checks nothing; see `_check`. Conv weights OIHW -> HWIO.
    """
    hwio = lambda k: np.asarray(state_dict[k], np.float32).transpose(2, 3, 1, 0)
    vgg = {
        name: {'kernel': hwio(f'features.{i}.weight'), 'bias': np.asarray(state_dict[f'features.{i}.bias'], np.float32)}
        for name, i, _, _ in _convs()
    }
    lins = {f'lin{k}': {'kernel': hwio(f'lin{k}.model.1.weight')} for k in range(len(WIDTHS))}
    return {'vgg': vgg, **lins}


def load_lpips_params(path: str) -> dict:
    """LPIPS params from the .npz that `python -m var_jax.convert --lpips_vgg16 ... --lpips_lin ...` writes."""
    if os.path.isdir(path):
        raise LPIPSWeightsError(f'{path} is a directory; perceptual_weights_path takes one .npz. {WHERE_TO_GET}')
    if not os.path.isfile(path):
        raise MissingFileError(f'{path} not found. {WHERE_TO_GET}')
    not_npz = lambda why: LPIPSWeightsError(f'{path} is not the LPIPS .npz ({why}). {WHERE_TO_GET}')
    try:
        npz = np.load(path)
    except (ValueError, OSError) as e:
        raise not_npz(e) from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise not_npz('one array, not named arrays')
    with npz:
        tensors = dict(npz)
    check_tensors(tensors, vgg16_torch_shapes() | lin_torch_shapes(), path)
    return state_dict_to_params(tensors)
