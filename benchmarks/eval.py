"""Speed of the evaluation's parts on this host: FID-Inception features, the Frechet distance, precision/recall.

Random Inception weights (speed does not depend on them). Prints one table: Inception features per second
for 256-px and 32-px inputs (both resized to 299; first call = trace + compile + run, then the median of
--iters calls), the float64 Frechet distance of two 2048-d statistics, precision/recall (k = 3) of --pr_n
sample against --pr_n reference features, and the projected cost of a 50K evaluation (FID-50K against
ADM's 10 000-image reference batch) without the sampling itself, which benchmarks/sample.py measures.

    python benchmarks/eval.py                       # CPU: batch 32
    python benchmarks/eval.py --batch 256 --iters 20    # a GPU
"""

import argparse
import os
import statistics
import time

import jax
import numpy as np

from var_jax import metrics
from var_jax.models import inception

import common  # noqa: F401  (the repository on sys.path, the CPU malloc setting)


def _timed(fn, iters):
    """(first call seconds, median steady seconds, share of the CPU cores this process used while steady)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times, c0, w0 = [], os.times(), time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    c1, wall = os.times(), time.perf_counter() - w0
    share = (c1.user + c1.system - c0.user - c0.system) / (wall * (os.cpu_count() or 1))
    return first, statistics.median(times), share


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch', type=int, default=32, help='images per Inception call (a multiple of the devices)')
    p.add_argument('--iters', type=int, default=5)
    p.add_argument('--pr_n', type=int, default=4000, help='features per side of the precision/recall timing')
    args = p.parse_args(argv)
    print(
        f'{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores'
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), inception.abstract_params())
    extractor = metrics.InceptionFeatures(params)
    rows = []
    rate = None
    for side in (256, 32):
        images = rng.integers(0, 256, (args.batch, side, side, 3), dtype=np.uint8)
        first, steady, share = _timed(lambda: extractor(images), args.iters)
        rate = rate or args.batch / steady
        rows.append(
            (
                f'Inception features, {side} px -> 299, batch {args.batch}',
                f'{first:.1f} s',
                f'{steady:.3f} s',
                f'{args.batch / steady:.1f} img/s',
                f'{share:.0%}',
            )
        )
    a = rng.standard_normal((3000, 2048)) @ rng.standard_normal((2048, 2048)) / 45
    stats = metrics.FeatureStats(2048)
    stats.update(a)
    mu, sigma = stats.mean_cov()
    first, steady, share = _timed(lambda: metrics.frechet_distance(mu, sigma, mu + 0.1, sigma), 1)
    fid_s = steady
    rows.append(('Frechet distance, 2048-d, float64', f'{first:.1f} s', f'{steady:.2f} s', '', f'{share:.0%}'))
    feats = rng.standard_normal((2 * args.pr_n, 2048)).astype(np.float32)
    first, steady, share = _timed(lambda: metrics.precision_recall(feats[: args.pr_n], feats[args.pr_n :]), 1)
    pr_s = steady
    rows.append(
        (f'precision/recall, {args.pr_n} vs {args.pr_n}, k=3', f'{first:.1f} s', f'{steady:.2f} s', '', f'{share:.0%}')
    )
    widths = [max(len(r[i]) for r in rows + [('part', 'first', 'steady', 'rate', 'CPU')]) for i in range(5)]
    print(' | '.join(h.ljust(w) for h, w in zip(('part', 'first', 'steady', 'rate', 'CPU'), widths)))
    for r in rows:
        print(' | '.join(c.ljust(w) for c, w in zip(r, widths)))
    # 50K evaluation: features of 50 000 samples + 10 000 references, FID and sFID, precision/recall whose
    # pairwise work grows as (50 000^2 + 10 000^2 + 2 * 50 000 * 10 000) / (4 * pr_n^2) of the timed one.
    pairs = (50_000**2 + 10_000**2 + 2 * 50_000 * 10_000) / (4 * args.pr_n**2)
    total = 60_000 / rate + 2 * fid_s + pairs * pr_s
    print(
        f'projected 50K evaluation without sampling: {total / 60:.1f} min (features {60_000 / rate / 60:.1f} min, '
        f'FID + sFID {2 * fid_s:.0f} s, precision/recall {pairs * pr_s / 60:.1f} min)'
    )


if __name__ == '__main__':
    main()
