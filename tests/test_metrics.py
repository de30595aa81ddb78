"""FID / sFID, Inception Score, precision and recall against independent references on the same features.

FID against pytorch-fid's `calculate_frechet_distance`, IS against torch-fidelity's; both skip without them
(CI installs them). Precision/recall against a plain numpy transcription of the paper's definition below.
"""

import numpy as np
import pytest

from var_jax import metrics

# pytorch-fid passes scipy's deprecated `disp` to sqrtm.
pytestmark = pytest.mark.filterwarnings('ignore:The `disp` argument is deprecated:DeprecationWarning')


def _features(n, d, seed, shift=0.0, scale=1.0):
    """Non-negative, correlated features like Inception's post-ReLU averages."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(1234).standard_normal((d, d)) / np.sqrt(d)
    return np.maximum(scale * rng.standard_normal((n, d)) @ mix + shift, 0).astype(np.float32)


def test_streaming_statistics_equal_numpy():
    x = _features(1000, 64, 0) + 50.0  # a large mean: the streaming covariance must not cancel it away
    stats = metrics.FeatureStats(64)
    for lo, hi in ((0, 7), (7, 7), (7, 600), (600, 1000)):  # uneven batches, one empty
        stats.update(x[lo:hi])
    mu, sigma = stats.mean_cov()
    assert stats.n == 1000
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('shift, scale', [(0.0, 1.0), (0.05, 1.1)])
def test_frechet_distance_equals_pytorch_fid(shift, scale):
    """Same distribution (FID = sampling noise, where cancellation bites) and a shifted one; FID from the
    streamed statistics vs pytorch-fid on np.mean / np.cov of the same features, 1e-6 relative."""
    pfid = pytest.importorskip('pytorch_fid.fid_score')
    d = 256
    a, b = _features(1500, d, 1), _features(1200, d, 2, shift, scale)
    stats = []
    for x in (a, b):
        s = metrics.FeatureStats(d)
        for lo in range(0, len(x), 256):
            s.update(x[lo : lo + 256])
        stats.append(s.mean_cov())
    ours = metrics.frechet_distance(*stats[0], *stats[1])
    want = pfid.calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert want > 0.1
    np.testing.assert_allclose(ours, want, rtol=1e-6)


def test_frechet_distance_of_rank_deficient_statistics():
    """Fewer images than dimensions (small evaluations): the eigenvalue form stays real and agrees with
    pytorch-fid's sqrtm where that one succeeds."""
    pfid = pytest.importorskip('pytorch_fid.fid_score')
    a, b = _features(100, 160, 3), _features(90, 160, 4, 0.1)
    sa, sb = (a.mean(0), np.cov(a, rowvar=False)), (b.mean(0), np.cov(b, rowvar=False))
    np.testing.assert_allclose(metrics.frechet_distance(*sa, *sb), pfid.calculate_frechet_distance(*sa, *sb), rtol=1e-6)
    assert metrics.frechet_distance(*sa, *sa) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match='statistics of different features'):
        metrics.frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))


@pytest.mark.parametrize('n', [1000, 1003])
def test_inception_score_equals_torch_fidelity(n):
    """torch-fidelity's IS on the same logits (no shuffling), 10 splits; 1003 checks the split boundaries."""
    torch = pytest.importorskip('torch')
    isc = pytest.importorskip('torch_fidelity.metric_isc')
    logits = np.random.default_rng(n).standard_normal((n, 1008)).astype(np.float32) * 3
    logits[:, :10] += 6 * (np.arange(n)[:, None] % 10 == np.arange(10))  # confident, diverse: IS well above 1
    want = isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    mean, std = metrics.inception_score(logits, splits=10)
    assert want['inception_score_mean'] > 2
    np.testing.assert_allclose(mean, want['inception_score_mean'], rtol=1e-10)
    np.testing.assert_allclose(std, want['inception_score_std'], rtol=1e-8)


def test_inception_score_needs_a_row_per_split():
    with pytest.raises(ValueError, match='at least 10 images'):
        metrics.inception_score(np.zeros((9, 1008)))


def _reference_precision_recall(real, fake, k):
    """Kynkaanniemi et al. 2019, eqs. 1-3, read literally: f(phi, Phi) = 1 if ||phi - phi'|| <=
    ||phi' - NN_k(phi', Phi)|| for some phi' in Phi (NN_k: the k-th nearest other member of Phi); precision =
    mean over fakes of f(fake, reals), recall = mean over reals of f(real, fakes). Exact float64 distances."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(phi):
        d = dist(phi, phi)
        return np.array([np.sort(np.delete(row, i))[k - 1] for i, row in enumerate(d)])

    def f(points, phi):
        return (dist(points, phi) <= radii(phi)[None, :]).any(axis=1)

    return f(fake, real).mean(), f(real, fake).mean()


def test_precision_recall_equal_the_paper_definition():
    """Samples that cover part of the references' support: both values strictly between 0 and 1; small row
    blocks so that several padded blocks are computed."""
    real = _features(300, 16, 5)
    fake = _features(250, 16, 6, shift=0.6, scale=1.0)
    want = _reference_precision_recall(real, fake, 3)
    assert 0.05 < want[0] < 0.95 and 0.05 < want[1] < 0.95
    got = metrics.precision_recall(real, fake, k=3, block=64)
    assert got == pytest.approx(want, abs=1e-12)
    assert metrics.precision_recall(real, fake, k=1, block=1000) == pytest.approx(
        _reference_precision_recall(real, fake, 1), abs=1e-12
    )


def test_manifold_needs_more_than_k_points():
    with pytest.raises(ValueError, match='k=3 nearest-neighbour manifold needs more than 3'):
        metrics.precision_recall(_features(3, 4, 0), _features(10, 4, 1))
