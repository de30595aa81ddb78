"""Batches for training (resumable at any step) and evaluation (the same on every host count).

Determinism and resume. Training batches are a pure function of (dataset, seed, step), so a
restarted run needs nothing but the step it resumes from:
  * Epochs are cut into `steps_per_epoch = host_examples // host_batch` full batches; step s is
    batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`. The last partial batch of an
    epoch is dropped (it differs per epoch).
  * Each epoch's example order comes from an epoch seed derived from (seed, epoch):
    - small splits (encoded size <= data.in_memory_max_mb, all folder sources) are held in memory
      as encoded bytes or file paths, and each epoch is a full numpy permutation seeded by the
      epoch seed. Resuming skips indices, which costs nothing.
    - larger TFDS splits (imagenet) are streamed: TFDS shuffles the file order with the epoch
      seed, interleaves deterministically, and a data.shuffle_buffer seeded the same way shuffles
      examples. Resuming mid-epoch skips the first examples of that epoch while they are still
      encoded (no JPEG decoding), so it costs one read pass over at most one epoch of this
      host's files. Determinism relies on tf.data's deterministic ordering, which is kept on,
      and on TensorFlow's global seed not being set (only this package uses TF).
  * Crop and flip use stateless random ops seeded with (epoch seed, position in the epoch), so
    they do not depend on threads or on where a run started.

Multi-host: the per-host batch is global_batch_size // process_count. A split held in memory is held whole by
every host, and each global batch is cut into the hosts' parts: host h reads rows [h*b, (h+1)*b) of every global
batch of the epoch's permutation, so the global batches (and their crops) are the same for any number of hosts,
and within an epoch no example is read twice or skipped. A streamed split: each process reads its own equal-size
shard (TFDS `even_splits` with drop_remainder), so all hosts have the same number of steps per epoch.
"""

import itertools
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf

from var_jax.data import preprocessing, sources
from var_jax.data.config import validate_config
from var_jax.errors import ConfigError


def process_layout(process_index: Optional[int] = None, process_count: Optional[int] = None) -> tuple:
    """(process_index, process_count), JAX's where not given, checked: which shard of the data this host reads."""
    if process_index is None or process_count is None:
        import jax  # Only needed for the defaults.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count}).')
    return process_index, process_count


def host_batch_size(global_batch_size: int, process_count: int) -> int:
    """This host's share of a global batch (each host loads its own examples)."""
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f'global batch size {global_batch_size} must be a positive multiple of '
            f'the process count {process_count}; change the batch size.'
        )
    return global_batch_size // process_count


def derive_seed(*ints) -> int:
    """A well-mixed non-negative 63-bit seed from several ints (e.g. (seed, epoch))."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, np.uint64)[0] >> 1)


def make_train_iterator(
    data_config,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Iterator[dict]:
    """Infinite iterator of this host's training batches, starting at global step `start_step`.

    `data_config` is `config.data`. Yields {'image': float32 (b, R, R, 3) in [-1, 1], 'label': int32 (b,)}
    with b = global_batch_size // process_count. The batch at step s depends only on
    (data_config, seed, s, process_index, process_count): see the module docstring.
    """
    cfg = validate_config(data_config)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be a non-negative int, got {seed!r}.')
    if start_step < 0:
        raise ValueError(f'start_step must be >= 0, got {start_step}.')
    process_index, process_count = process_layout(process_index, process_count)
    batch = host_batch_size(global_batch_size, process_count)
    shard = sources.shard(cfg, True, process_index, process_count)
    if process_count > 1 and shard.select is not None:  # in memory: the whole split, cut per global batch
        shard = sources.shard(cfg, True, 0, 1)
    whole = shard.select is not None
    steps_per_epoch = shard.num_examples // (global_batch_size if whole else batch)
    if steps_per_epoch == 0:
        raise ConfigError(
            f'{"the split" if whole else "this host"} has {shard.num_examples} training examples, fewer '
            f'than one batch of {global_batch_size if whole else batch}; use a smaller batch or more data.'
        )
    first_epoch, skip_batches = divmod(int(start_step), steps_per_epoch)

    def epoch_examples(epoch_seed):
        """(position in the epoch, (key, label)) of this host's examples: the position seeds crop and flip."""
        if not whole:
            return shard.ordered(epoch_seed).take(steps_per_epoch * batch).enumerate()
        order = np.random.default_rng(epoch_seed).permutation(shard.num_examples)
        rows = order[: steps_per_epoch * global_batch_size].reshape(steps_per_epoch, process_count, batch)
        positions = (
            np.arange(steps_per_epoch)[:, None] * global_batch_size + process_index * batch + np.arange(batch)[None]
        ).ravel()
        return tf.data.Dataset.zip(
            tf.data.Dataset.from_tensor_slices(positions), shard.select(rows[:, process_index].ravel())
        )

    def batches():
        skip = skip_batches
        for epoch in itertools.count(first_epoch):
            epoch_seed = derive_seed(seed, epoch)
            ds = (
                epoch_examples(epoch_seed)
                .skip(skip * batch)
                .map(preprocessing.train_preprocess(cfg, epoch_seed, shard.decode), num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch, drop_remainder=True)
                .prefetch(2)
            )
            yield from ds.as_numpy_iterator()
            skip = 0

    return batches()


def make_eval_iterator(
    data_config, global_batch_size: int, *, process_index: Optional[int] = None, process_count: Optional[int] = None
) -> Iterator[dict]:
    """Finite iterator over this host's part of the eval split (center crop), in a fixed order.

    Every host yields the same number of batches (collectives need it): partial and missing
    batches are zero-padded, and 'mask' (bool, (b,)) marks the real examples.
    """
    cfg = validate_config(data_config)
    process_index, process_count = process_layout(process_index, process_count)
    batch = host_batch_size(global_batch_size, process_count)
    shard = sources.shard(cfg, False, process_index, process_count)
    num_batches = -(-shard.largest_shard // batch)

    def pad(example, n):
        out = {k: np.zeros((batch,) + v.shape[1:], v.dtype) for k, v in example.items()}
        for k, v in example.items():
            out[k][:n] = v[:n]
        out['mask'] = np.arange(batch) < n
        return out

    def batches():
        size = cfg.image_size
        count = 0
        ds = (
            shard.ordered(None)
            .map(preprocessing.eval_preprocess(cfg, shard.decode), num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch)
            .prefetch(2)
        )
        for example in ds.as_numpy_iterator():
            count += 1
            yield pad(example, len(example['label']))
        empty = {'image': np.zeros((0, size, size, 3), np.float32), 'label': np.zeros((0,), np.int32)}
        while count < num_batches:
            count += 1
            yield pad(empty, 0)

    return batches()
