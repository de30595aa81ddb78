"""Torch-exact resize matrices for every (n_in, n_out) pair of the 256- and 512-px schedules."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.models.resize import resize, resize_matrix

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PAIRS = sorted(
    {(pns[-1], p) for pns in (PN_256, PN_512) for p in pns[:-1]}  # area: latent -> scale
    | {(p, pns[-1]) for pns in (PN_256, PN_512) for p in pns[:-1]}  # bicubic: scale -> latent
    | {(a, b) for pns in (PN_256, PN_512) for a, b in zip(pns, pns[1:])}
)


def direct_area(x, n_out):
    """Adaptive average pooling, written per output cell."""
    n_in = len(x)
    return np.array([x[(i * n_in) // n_out : -((-(i + 1) * n_in) // n_out)].mean() for i in range(n_out)])


def direct_bicubic(x, n_out, a=-0.75):
    """torch upsample_bicubic2d (align_corners=False), written per output pixel."""
    n_in = len(x)
    out = []
    for i in range(n_out):
        real = n_in / n_out * (i + 0.5) - 0.5
        i0 = math.floor(real)
        t = real - i0
        taps = [x[min(max(i0 + k, 0), n_in - 1)] for k in (-1, 0, 1, 2)]
        dists = [1 + t, t, 1 - t, 2 - t]
        w = [((a * d - 5 * a) * d + 8 * a) * d - 4 * a if d > 1 else ((a + 2) * d - (a + 3)) * d * d + 1 for d in dists]
        out.append(sum(wi * ti for wi, ti in zip(w, taps)))
    return np.array(out)


def direct_bilinear(x, n_out):
    n_in = len(x)
    out = []
    for i in range(n_out):
        real = max(n_in / n_out * (i + 0.5) - 0.5, 0.0)
        i0 = int(real)
        i1 = min(i0 + 1, n_in - 1)
        t = real - i0
        out.append((1 - t) * x[i0] + t * x[i1])
    return np.array(out)


@pytest.mark.parametrize('n_in,n_out', PAIRS)
def test_matrices_match_direct_formulas(n_in, n_out):
    x = np.random.default_rng(n_in * 100 + n_out).standard_normal(n_in)
    for method, direct in (('bicubic', direct_bicubic), ('bilinear', direct_bilinear)):
        np.testing.assert_allclose(resize_matrix(n_in, n_out, method) @ x, direct(x, n_out), atol=1e-12)
    if n_out <= n_in:
        np.testing.assert_allclose(resize_matrix(n_in, n_out, 'area') @ x, direct_area(x, n_out), atol=1e-12)


def test_area_differs_from_uniform_bins():
    """16 -> 13 area uses overlapping bins [floor(16i/13), ceil(16(i+1)/13)) of width 2 or 3."""
    m = resize_matrix(16, 13, 'area')
    assert (m > 0).sum(axis=1).tolist() == [2, 2, 2, 2, 3, 2, 2, 2, 3, 2, 2, 2, 2]
    assert np.count_nonzero(m[4]) == 3 and np.flatnonzero(m[4]).tolist() == [4, 5, 6]


def test_bicubic_from_one_pixel_is_constant():
    np.testing.assert_allclose(resize_matrix(1, 16, 'bicubic'), np.ones((16, 1)), atol=1e-15)


def test_against_torch_interpolate():
    torch = pytest.importorskip('torch')
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    for n_in, n_out in PAIRS:
        x = rng.standard_normal((1, 2, n_in, n_in))
        modes = ['bicubic', 'bilinear'] + (['area'] if n_out <= n_in else [])
        for mode in modes:
            kw = {} if mode == 'area' else {'align_corners': False}
            ref = F.interpolate(torch.from_numpy(x), size=(n_out, n_out), mode=mode, **kw).numpy()
            ours = resize(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32), (n_out, n_out), mode)
            np.testing.assert_allclose(
                np.asarray(ours).transpose(0, 3, 1, 2), ref, atol=2e-5, err_msg=f'{mode} {n_in}->{n_out}'
            )


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match='unknown resize method'):
        resize_matrix(4, 8, 'nearest')
