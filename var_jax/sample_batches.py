"""Many samples with a config's settings: the labels of `config.sample.labels`, one compiled batch shape.

The sampling command, the evaluation and the trainer's sample grids and FID all sample this way: labels
parsed from the config string, cut into batches of one size (the last padded, so one program serves all),
split over every device of every host, batch i drawn with `fold_in(key, i)` so that a batch's images do
not depend on which other batches a run samples (a resumed evaluation samples only the missing ones).
"""

import math
from typing import Iterable, Iterator, Optional

import jax
import numpy as np

from var_jax import sampling, sharding

SETTINGS = ('cfg', 'top_k', 'top_p', 'temperature', 'more_smooth')  # the sampler's keyword arguments


def parse_labels(spec: str, num_images: int, num_classes: int) -> np.ndarray:
    """config.sample.labels -> (num_images,) int32 labels; a negative label becomes num_classes (the null class).

    '' -> 0, 1, 2, ... cycled (a grid num_classes wide has one class per column); '3' -> all 3;
    '1,2,3' -> cycled to num_images; -1 -> unconditional. Raises ValueError for anything else, or for a
    label >= num_classes.
    """
    if not spec:
        return (np.arange(num_images) % num_classes).astype(np.int32)
    try:
        values = np.asarray([int(x) for x in str(spec).split(',') if x.strip()], np.int32)
    except ValueError:
        raise ValueError(f'sample.labels={spec!r}: give comma-separated class indices, e.g. "1,2,3"') from None
    if values.size == 0:
        raise ValueError(f'sample.labels={spec!r}: give comma-separated class indices, e.g. "1,2,3"')
    if values.max() >= num_classes:
        raise ValueError(
            f'sample.labels={spec!r}: the model has {num_classes} classes, so labels must be in '
            f'[0, {num_classes}), or -1 for unconditional samples'
        )
    return np.resize(np.where(values < 0, num_classes, values).astype(np.int32), num_images)


def settings(sample_config) -> dict:
    """The sampler's keyword arguments (cfg, top_k, top_p, temperature, more_smooth) from config.sample."""
    return {k: sample_config[k] for k in SETTINGS}


def batch_size_for(requested: int, num_images: int, mesh: jax.sharding.Mesh) -> int:
    """The batch size to sample with: at most `requested` (or num_images), rounded up to the devices."""
    n_dev = mesh.devices.size
    return max(n_dev, -(-min(requested, num_images) // n_dev) * n_dev)


def sample_batches(
    models,
    labels: np.ndarray,
    key,
    sampler_settings: dict,
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    batches: Optional[Iterable[int]] = None,
) -> Iterator[tuple]:
    """Yields (i, n, out) for batch i of `labels` (default: every batch): `sampling.sample`'s output for
    labels[i * batch_size:][:batch_size], padded to batch_size, and n, how many of its rows are real.

    models: (vqvae, vae_params, var, var_params); every host passes the same labels and key. The labels are
    split over `mesh` (batch_size must be a multiple of its devices), so out's arrays are global arrays:
    `sharding.to_host` gathers them.
    """
    if batch_size % mesh.devices.size:
        raise ValueError(f'batch_size={batch_size} must be a multiple of the {mesh.devices.size} devices')
    vqvae, vae_params, var, var_params = models
    split = sharding.batch_sharding(mesh)
    for i in range(math.ceil(len(labels) / batch_size)) if batches is None else batches:
        chunk = labels[i * batch_size : (i + 1) * batch_size]
        padded = np.resize(chunk, batch_size)
        device_labels = jax.make_array_from_callback(padded.shape, split, lambda index: padded[index])
        out = sampling.sample(
            vqvae, vae_params, var, var_params, device_labels, jax.random.fold_in(key, i), **sampler_settings
        )
        yield i, len(chunk), out
