"""The InceptionV3 of FID (TensorFlow's 2015-12-05 graph as `pytorch-fid` ports it), NHWC, in Flax.

FID, sFID, Inception Score and precision/recall all read this network. It is torchvision's
InceptionV3 with the FID graph's differences, which `pytorch-fid` patches in:
- the 3x3 average pools of the A, C and first E blocks leave the zero padding out of the mean
  (TensorFlow's `count_include_pad=False`);
- the last E block (Mixed_7c) pools its fourth branch with a 3x3 max-pool instead of an average;
- 1008 classes (the graph's own label set), no auxiliary classifier.
Input handling is `pytorch-fid`'s: images in [0, 1] are resized to 299 x 299 with torch's bilinear
interpolation (align_corners=False, no antialias) and mapped to [-1, 1].

Outputs (a dict): 'pool' (B, 2048), the average-pooled features of FID; 'logits' (B, 1008), the
classifier with its bias; 'logits_unbiased' (B, 1008), the classifier without bias, which the ADM
suite (and torch-fidelity) feed to the softmax of the Inception Score; 'spatial' (B, 2023), the
sFID features of the ADM suite: the graph's `mixed_6/conv` (Mixed_6d's 1x1 branch, 17 x 17 x 192)
cut to its first 7 channels and flattened in NHWC order, as `evaluations/evaluator.py` does.

Weights are never downloaded: `python -m var_jax.convert --inception <pth> --out <npz>` converts
the file `pytorch-fid` uses (WHERE_TO_GET) once; `load_params(npz)` reads it without torch.
"""

import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from var_jax.errors import MissingFileError, UserError
from var_jax.models.resize import resize

SIZE = 299  # the graph's input side
NUM_CLASSES = 1008  # the 2015 graph's label set
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
PTH_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WHERE_TO_GET = (
    f"{PTH_FILE} is the FID Inception of pytorch-fid (TensorFlow's 2015-12-05 graph ported to PyTorch): "
    f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PTH_FILE} (also cached by '
    f'pytorch-fid in ~/.cache/torch/hub/checkpoints/). Convert it once (needs torch): python -m var_jax.convert '
    f'--inception {PTH_FILE} --out checkpoints/inception_fid.npz, then set --config.eval.inception_path to the .npz'
)


class InceptionWeightsError(UserError):
    """A weights file that does not hold the FID Inception."""


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm with frozen statistics (eps 1e-3) -> ReLU, as torchvision's BasicConv2d.

    The BN parameters keep torch's names (scale = weight, bias, running_mean, running_var) so that the
    converter maps state-dict keys one to one.
    """

    features: int
    kernel: Sequence[int] = (1, 1)
    stride: int = 1
    padding: Sequence[int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            tuple(self.kernel),
            (self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            name='conv',
        )(x)
        bn = _FrozenBatchNorm(self.features, name='bn')
        return nn.relu(bn(x))


class _FrozenBatchNorm(nn.Module):
    features: int
    eps: float = 1e-3

    @nn.compact
    def __call__(self, x):
        p = lambda name, init: self.param(name, init, (self.features,), jnp.float32)  # noqa: E731
        scale, bias = p('scale', nn.initializers.ones), p('bias', nn.initializers.zeros)
        mean, var = p('running_mean', nn.initializers.zeros), p('running_var', nn.initializers.ones)
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class _Classifier(nn.Module):
    """The fc layer as (x @ kernel, bias): the Inception Score of ADM uses the product without the bias."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
        return jnp.dot(x, kernel), bias


def _avg_pool_3x3(x):
    # TensorFlow's average pool: the zero padding does not count in the mean.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, name='branch1x1')(x)
        b5 = BasicConv2d(48, name='branch5x5_1')(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
        b3 = BasicConv2d(64, name='branch3x3dbl_1')(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
        bp = BasicConv2d(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: the 35 -> 17 reduction."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name='branch3x3')(x)
        bd = BasicConv2d(64, name='branch3x3dbl_1')(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, name='branch3x3dbl_3')(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """The 17 x 17 blocks; also returns the 1x1 branch (Mixed_6d's is the graph's mixed_6/conv)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, name='branch1x1')(x)
        b7 = BasicConv2d(c7, name='branch7x7_1')(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
        bd = BasicConv2d(c7, name='branch7x7dbl_1')(x)
        for i, (c, k) in enumerate(((c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7)))):
            bd = BasicConv2d(c, k, padding=(k[0] // 2, k[1] // 2), name=f'branch7x7dbl_{i + 2}')(bd)
        bp = BasicConv2d(192, name='branch_pool')(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    """Mixed_7a: the 17 -> 8 reduction."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, name='branch3x3_1')(x)
        b3 = BasicConv2d(320, (3, 3), stride=2, name='branch3x3_2')(b3)
        b7 = BasicConv2d(192, name='branch7x7x3_1')(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
        b7 = BasicConv2d(192, (3, 3), stride=2, name='branch7x7x3_4')(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """The 8 x 8 blocks; `max_pool` is the FID graph's Mixed_7c, which max-pools its pool branch."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, name='branch1x1')(x)
        b3 = BasicConv2d(384, name='branch3x3_1')(x)
        b3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
            ],
            axis=-1,
        )
        bd = BasicConv2d(448, name='branch3x3dbl_1')(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
            ],
            axis=-1,
        )
        # torch's max_pool2d pads with -inf, as flax's max_pool does.
        pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool else _avg_pool_3x3(x)
        bp = BasicConv2d(192, name='branch_pool')(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID InceptionV3. images: (B, H, W, 3) float in [0, 1] (any side; resized to 299).

    Returns {'pool': (B, 2048), 'logits': (B, 1008), 'logits_unbiased': (B, 1008), 'spatial': (B, 2023)}.
    `resize_input=False` feeds the images as they are (they must then be 299 px for 'spatial').
    """

    resize_input: bool = True

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32)
        if self.resize_input:
            x = resize(x, (SIZE, SIZE), 'bilinear')
        x = 2.0 * x - 1.0
        x = BasicConv2d(32, (3, 3), stride=2, name='Conv2d_1a_3x3')(x)
        x = BasicConv2d(32, (3, 3), name='Conv2d_2a_3x3')(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, name='Conv2d_3b_1x1')(x)
        x = BasicConv2d(192, (3, 3), name='Conv2d_4a_3x3')(x)
        x = _max_pool_3x3_s2(x)
        for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
            x = InceptionA(pool_features, name=name)(x)
        x = InceptionB(name='Mixed_6a')(x)
        for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
            x, branch1x1 = InceptionC(c7, name=name)(x)
            if name == 'Mixed_6d':  # the graph's mixed_6/conv
                spatial = branch1x1[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = InceptionD(name='Mixed_7a')(x)
        x = InceptionE(name='Mixed_7b')(x)
        x = InceptionE(max_pool=True, name='Mixed_7c')(x)
        pool = jnp.mean(x, axis=(1, 2))
        unbiased, bias = _Classifier(NUM_CLASSES, name='fc')(pool)
        return {'pool': pool, 'logits': unbiased + bias, 'logits_unbiased': unbiased, 'spatial': spatial}


def abstract_params():
    """The params tree of InceptionV3 as shapes (no compute)."""
    return jax.eval_shape(lambda: InceptionV3().init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3))))['params']


def init_params(key):
    """Random params (tests and benchmarks): conv/dense as flax initialises them, BN statistics the identity."""
    return InceptionV3().init(key, jnp.zeros((1, SIZE, SIZE, 3)))['params']


def flatten_params(params) -> dict:
    """params -> {'Mixed_5b/branch1x1/conv/kernel': float32 array, ...}: the .npz layout `load_params` reads."""
    return {'/'.join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}


def load_params(path: str):
    """Reads the .npz of `python -m var_jax.convert --inception` (`flatten_params` layout); checks every entry."""
    if not path:
        raise InceptionWeightsError(
            'no Inception weights configured (config.eval.inception_path is empty). ' + WHERE_TO_GET
        )
    if not os.path.exists(path):
        raise MissingFileError(f'Inception weights {path} not found. ' + WHERE_TO_GET)
    if not path.endswith('.npz'):
        raise InceptionWeightsError(
            f'{path}: expected the .npz written by python -m var_jax.convert --inception. ' + WHERE_TO_GET
        )
    with np.load(path) as f:
        flat = {k: f[k] for k in f.files}
    expected = {'/'.join(k): v.shape for k, v in traverse_util.flatten_dict(abstract_params()).items()}
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    misshaped = [
        f'{k}: file {flat[k].shape}, model {expected[k]}'
        for k in expected
        if k in flat and flat[k].shape != expected[k]
    ]
    if missing or unexpected or misshaped:
        report = '; '.join(
            f'{len(v)} {t}: {", ".join(map(str, v[:5]))}{" ..." if len(v) > 5 else ""}'
            for t, v in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped))
            if v
        )
        raise InceptionWeightsError(f'{path} is not the FID Inception ({report}). ' + WHERE_TO_GET)
    return traverse_util.unflatten_dict({tuple(k.split('/')): jnp.asarray(v, jnp.float32) for k, v in flat.items()})
