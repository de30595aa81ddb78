"""Sample-quality metrics on Inception features: FID, sFID, Inception Score, precision and recall.

They follow OpenAI's ADM evaluation suite (guided-diffusion `evaluations/evaluator.py`), which VAR's
paper uses:
- FID / sFID: the Frechet distance between Gaussians fitted to the 2048-d pool features / the 2023-d
  spatial features, in float64. The statistics accumulate batch by batch (`FeatureStats`), so 50 000
  feature vectors are never needed at once.
- Inception Score: exp(E KL(p(y|x) || p(y))) on the softmax of the classifier without its bias, in
  10 splits (ADM's split of 5 000 for 50 000 images).
- Precision / recall (Kynkaanniemi et al. 2019, k = 3): a sample counts as precise when it lies in the
  ball of some reference image whose radius is the distance to that image's 3rd nearest reference
  neighbour; recall is the same with the roles swapped. Distances are squared Euclidean, computed on
  the devices block by block with the rows sharded over all devices.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import checkpoint, sharding


class FeatureStats:
    """Streaming mean and covariance (np.cov's unbiased estimate) of feature vectors, in float64.

    Sums are taken around a fixed shift (the first batch's mean) so that the covariance does not suffer
    from cancellation against the mean.
    """

    def __init__(self, dim: int):
        self.dim, self.n = dim, 0
        self._shift = None
        self._sum = np.zeros(dim, np.float64)
        self._outer = np.zeros((dim, dim), np.float64)

    def update(self, features) -> None:
        x = np.asarray(features, np.float64).reshape(-1, self.dim)
        if not len(x):
            return
        if self._shift is None:
            self._shift = x.mean(0)
        x = x - self._shift
        self.n += len(x)
        self._sum += x.sum(0)
        self._outer += x.T @ x

    def mean_cov(self):
        """(mu (D,), sigma (D, D)), both float64."""
        if self.n < 2:
            raise ValueError(f'statistics need at least 2 feature vectors, got {self.n}')
        m = self._sum / self.n
        cov = (self._outer - self.n * np.outer(m, m)) / (self.n - 1)
        return m + self._shift, (cov + cov.T) / 2


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2 (similar to
    S1 S2, and symmetric): two symmetric eigendecompositions instead of a general matrix square root,
    faster than scipy's sqrtm (which pytorch-fid and ADM use) and stable for rank-deficient covariances
    (fewer images than dimensions), where sqrtm can return complex noise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(
            f'statistics of different features: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}'
        )
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def inception_score(logits, splits: int = 10):
    """(mean, std) over `splits` equal chunks (rows i*N//splits ... (i+1)*N//splits) of exp(E_x KL(p(y|x) || p(y))).

    logits: (N, C) Inception classifier outputs; ADM and torch-fidelity use the classifier without its bias.
    """
    logits = np.asarray(logits, np.float64)
    n = len(logits)
    if n < splits:
        raise ValueError(f'the Inception Score in {splits} splits needs at least {splits} images, got {n}')
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        log_q = np.log(p[lo:hi].mean(0, keepdims=True))
        scores.append(np.exp(np.mean(np.sum(p[lo:hi] * (log_p[lo:hi] - log_q), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds), on the devices
# ------------------------------------------------------------------------------------------------
def _sq_distances(rows, cols):
    """(R, N) squared Euclidean distances, as ADM: |u|^2 - 2 u.v + |v|^2, clipped at 0."""
    hp = jax.lax.Precision.HIGHEST
    norm_r = jnp.sum(rows * rows, axis=1)[:, None]
    norm_c = jnp.sum(cols * cols, axis=1)[None, :]
    return jnp.maximum(norm_r - 2 * jnp.dot(rows, cols.T, precision=hp) + norm_c, 0.0)


@functools.partial(jax.jit, static_argnums=2)
def _kth_smallest(rows, cols, k: int):
    # The set's own point is among the columns at distance 0, so the (k+1)-th smallest is the k-th neighbour.
    return -jax.lax.top_k(-_sq_distances(rows, cols), k + 1)[0][:, k]


@jax.jit
def _inside_any_ball(rows, cols, col_radii):
    return jnp.any(_sq_distances(rows, cols) <= col_radii[None, :], axis=1)


def _row_blocks(fn, rows: np.ndarray, block: int, mesh, *args):
    """fn(row block, *args) over all rows, each block padded to `block` rows and sharded over the mesh."""
    n_dev = mesh.devices.size
    block = max(n_dev, -(-min(block, len(rows)) // n_dev) * n_dev)
    out = []
    for lo in range(0, len(rows), block):
        chunk = rows[lo : lo + block]
        padded = np.zeros((block,) + rows.shape[1:], np.float32)
        padded[: len(chunk)] = chunk
        res = fn(jax.device_put(padded, sharding.batch_sharding(mesh)), *args)
        out.append(np.asarray(jax.device_get(res))[: len(chunk)])
    return np.concatenate(out)


def manifold_radii(features, k: int = 3, block: int = 2048, mesh=None) -> np.ndarray:
    """(N,) squared distance of each feature vector to its k-th nearest neighbour in the same set."""
    features = np.asarray(features, np.float32)
    if len(features) <= k:
        raise ValueError(f'a k={k} nearest-neighbour manifold needs more than {k} feature vectors, got {len(features)}')
    mesh = mesh or sharding.make_mesh(1)
    cols = jax.device_put(features, sharding.replicated(mesh))
    return _row_blocks(lambda r, c: _kth_smallest(r, c, k), features, block, mesh, cols)


def precision_recall(
    ref_features, sample_features, k: int = 3, block: int = 2048, mesh: Optional[jax.sharding.Mesh] = None
):
    """(precision, recall) of samples against references, ADM's improved precision/recall with k neighbours."""
    mesh = mesh or sharding.make_mesh(1)
    ref, smp = np.asarray(ref_features, np.float32), np.asarray(sample_features, np.float32)
    rep = sharding.replicated(mesh)
    ref_r, smp_r = manifold_radii(ref, k, block, mesh), manifold_radii(smp, k, block, mesh)
    ref_d, smp_d = jax.device_put((ref, smp), rep)
    precise = _row_blocks(_inside_any_ball, smp, block, mesh, ref_d, jax.device_put(ref_r, rep))
    recalled = _row_blocks(_inside_any_ball, ref, block, mesh, smp_d, jax.device_put(smp_r, rep))
    return float(np.mean(precise)), float(np.mean(recalled))


def summarize(pool, spatial, pool_features, logits, ref: dict, is_splits: int = 10, pr_k: int = 3, mesh=None) -> dict:
    """FID and sFID from streamed statistics, IS from the logits, precision/recall from the pool features."""
    mu, sigma = pool.mean_cov()
    mu_s, sigma_s = spatial.mean_cov()
    is_mean, is_std = inception_score(logits, is_splits)
    precision, recall = precision_recall(ref['pool'], pool_features, pr_k, mesh=mesh)
    return {
        'fid': frechet_distance(mu, sigma, ref['mu'], ref['sigma']),
        'sfid': frechet_distance(mu_s, sigma_s, ref['mu_s'], ref['sigma_s']),
        'inception_score': is_mean,
        'inception_score_std': is_std,
        'precision': precision,
        'recall': recall,
    }


# ------------------------------------------------------------------------------------------------
# Inception features of image batches, sharded over the devices
# ------------------------------------------------------------------------------------------------
class InceptionFeatures:
    """Jitted FID-Inception features of uint8 NHWC image batches, the batch split over all devices.

    Call it with a global jax.Array (e.g. a sampler's output) or with this host's part of a global batch
    (numpy); every host gets the whole batch's features back as numpy:
    {'pool': (B, 2048), 'logits_unbiased': (B, 1008), 'spatial': (B, 2023)}. `fingerprint` identifies the
    weights (cached reference statistics record it).
    """

    KEYS = ('pool', 'logits_unbiased', 'spatial')

    def __init__(self, params, mesh: Optional[jax.sharding.Mesh] = None):
        from var_jax.models.inception import InceptionV3

        self.mesh = mesh or sharding.make_mesh(1)
        self.fingerprint = checkpoint.fingerprint(params)[:16]
        self.params = jax.device_put(params, sharding.replicated(self.mesh))
        model = InceptionV3()

        def features(p, images):
            out = model.apply({'params': p}, images.astype(jnp.float32) / 255.0)
            return {k: out[k] for k in self.KEYS}

        self._batch = sharding.batch_sharding(self.mesh)
        # Fixed shardings: one executable per batch size, whatever layout the images arrive in.
        self._fn = jax.jit(
            features,
            in_shardings=(sharding.replicated(self.mesh), self._batch),
            out_shardings=sharding.replicated(self.mesh),
        )

    def __call__(self, images) -> dict:
        if not isinstance(images, jax.Array):
            images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f'Inception features take uint8 NHWC RGB images, got {images.dtype} {images.shape}')
        if not isinstance(images, jax.Array):
            images = sharding.global_batch(images, self.mesh)
        elif images.sharding != self._batch:
            images = jax.device_put(images, self._batch)
        out = self._fn(self.params, images)
        return {k: np.asarray(v) for k, v in out.items()}


def to_uint8(images) -> np.ndarray:
    """Images in [0, 1] -> uint8 as the official VAR demo saves samples (x 255, then truncation)."""
    return (np.clip(np.asarray(images, np.float32), 0, 1) * 255).astype(np.uint8)


def fid_of_images(images, ref: dict, extractor: 'InceptionFeatures', batch_size: int = 64) -> float:
    """FID of images ((N, R, R, 3) in [0, 1], or uint8; every host holds all of them) against reference
    statistics {'mu', 'sigma'}: the same value on every host."""
    images = np.asarray(images)
    images = images if images.dtype == np.uint8 else to_uint8(images)
    n_dev = extractor.mesh.devices.size
    batch = -(-min(batch_size, len(images)) // n_dev) * n_dev
    stats = FeatureStats(2048)
    for lo in range(0, len(images), batch):
        chunk = images[lo : lo + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], np.uint8)])
        batch_array = jax.make_array_from_callback(
            padded.shape, sharding.batch_sharding(extractor.mesh), lambda idx: padded[idx]
        )
        stats.update(extractor(batch_array)['pool'][: len(chunk)])
    mu, sigma = stats.mean_cov()
    return frechet_distance(mu, sigma, ref['mu'], ref['sigma'])
