"""tf.data input pipeline for VAR training and evaluation: TFDS, image folders, synthetic data.

Sources (`data_config.source`):
  * 'tfds': any prepared TFDS dataset by name (cifar10, imagenet2012, ...), read from
    `data_config.data_dir` with `try_gcs=False`. Nothing is ever downloaded here; a dataset that is
    not prepared raises FileNotFoundError saying how to prepare it.
  * 'folder': the user's images in `folder/<class_name>/**/*.{jpg,png,...}`; labels are the
    indices of the sorted class names. Every image is opened once with PIL while indexing, so
    corrupt files are skipped (one warning with the count) instead of failing mid-training; at
    training time PIL decodes and converts to RGB exactly as the official VAR loader does.
  * 'synthetic' (the default): the project's own shapes dataset (`var_jax.synthetic_data`), a local
    TFDS dataset generated into `data_dir` on first use (`data_dir=None` means TFDS's default,
    `$TFDS_DATA_DIR` or `~/tensorflow_datasets`). It then flows through the TFDS code path.

`data_config` holds the fields of `default_data_config()`; fields it leaves out take those defaults.

Preprocessing follows the official VAR: train = resize the short side to round(resize_ratio * R)
with Lanczos, random RxR crop, optional horizontal flip (off by default, as in VAR), scale to
[-1, 1]; eval = the same resize and a center crop. The resized image is rounded and clipped to
0..255 because the official pipeline goes through a uint8 PIL image there.

Determinism and resume. Training batches are a pure function of (dataset, seed, step), so a
restarted run needs nothing but the step it resumes from:
  * Epochs are cut into `steps_per_epoch = host_examples // host_batch` full batches; step s is
    batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`. The last partial batch of an
    epoch is dropped (it differs per epoch).
  * Each epoch's example order comes from an epoch seed derived from (seed, epoch):
    - small splits (encoded size <= `in_memory_max_mb`, all folder sources) are held in memory
      as encoded bytes or file paths, and each epoch is a full numpy permutation seeded by the
      epoch seed. Resuming skips indices, which costs nothing.
    - larger TFDS splits (imagenet) are streamed: TFDS shuffles the file order with the epoch
      seed, interleaves deterministically, and a `shuffle_buffer` seeded the same way shuffles
      examples. Resuming mid-epoch skips the first examples of that epoch while they are still
      encoded (no JPEG decoding), so it costs one read pass over at most one epoch of this
      host's files. Determinism relies on tf.data's deterministic ordering, which is kept on,
      and on TensorFlow's global seed not being set (TF is private to this module).
  * Crop and flip use stateless random ops seeded with (epoch seed, position in the epoch), so
    they do not depend on threads or on where a run started.

Multi-host: each process reads its own equal-size shard of the split (TFDS `even_splits` with
drop_remainder, or an equal slice of the folder's file list), so all hosts have the same number of
steps per epoch. The per-host batch is global_batch_size // process_count.

TensorFlow only runs on the CPU here, and only this module imports it, so the rest of the project
stays importable without TensorFlow.
"""
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import pathlib
import warnings
from typing import Callable, Iterator, Optional

import ml_collections
import numpy as np
import PIL.Image
import tensorflow as tf
import tensorflow_datasets as tfds

from var_jax import synthetic_data


def _hide_accelerators_from_tf():
    """JAX owns the accelerators; TF grabbing GPU memory for the input pipeline would starve it."""
    try:
        tf.config.set_visible_devices([], 'GPU')
    except (RuntimeError, ValueError):  # TF's devices already initialised, or no GPU support.
        pass


_hide_accelerators_from_tf()

SOURCES = ('tfds', 'folder', 'synthetic')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


def default_data_config() -> ml_collections.ConfigDict:
    """Data settings with defaults for the offline synthetic dataset at 32x32."""
    return ml_collections.ConfigDict(dict(
        source='synthetic',           # 'tfds' | 'folder' | 'synthetic'
        name='var_synthetic_shapes',  # TFDS name for source='tfds', e.g. 'cifar10', 'imagenet2012'
        data_dir=None,                # TFDS data_dir; None: $TFDS_DATA_DIR, ~/tensorflow_datasets
        folder='',                    # source='folder': root/<class_name>/<images>
        eval_folder='',               # source='folder': eval images; '' = evaluate on `folder`
        train_split='train',
        eval_split='test',            # imagenet2012: 'validation'
        image_size=32,                # R
        resize_ratio=1.125,           # short side is resized to round(resize_ratio * R) first
        random_flip=False,            # official VAR default: no horizontal flip
        shuffle_buffer=16384,         # only for TFDS splits too big to hold in memory
        in_memory_max_mb=1024,        # TFDS splits up to this encoded size are held in memory
        synthetic_seed=0,             # the synthetic dataset is a pure function of these three
        synthetic_train_size=10000,
        synthetic_test_size=1000,
    ))


# ----------------------------------------------------------------------------- validation


def _resolve(data_config) -> ml_collections.ConfigDict:
    """The given settings over the defaults, so configs may name only the fields they change."""
    given = dict(data_config.to_dict() if hasattr(data_config, 'to_dict') else data_config)
    defaults = default_data_config().to_dict()
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        logging.warning('Ignoring unknown data config fields %s (known: %s).', unknown,
                        sorted(defaults))
    cfg = ml_collections.ConfigDict({**defaults, **{k: given[k] for k in given if k in defaults}})
    _check_config(cfg)
    return cfg


def _check_config(cfg):
    if cfg.source not in SOURCES:
        raise ValueError(f'data.source={cfg.source!r} is unknown; use one of {SOURCES}.')
    size = cfg.image_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f'data.image_size must be a positive int (the training resolution R), '
                         f'got {size!r}.')
    if not cfg.resize_ratio >= 1.0:
        raise ValueError(f'data.resize_ratio must be >= 1 (the short side is resized to '
                         f'round(resize_ratio * R) before the RxR crop), got {cfg.resize_ratio!r}.')
    if cfg.source == 'folder' and not cfg.folder:
        raise ValueError("data.source='folder' needs data.folder=<root, one subfolder per class>.")


def _process_layout(global_batch_size, process_index, process_count):
    """(process_index, process_count, per-host batch); the process layout defaults to JAX's."""
    if process_index is None or process_count is None:
        import jax  # Only needed for the defaults.
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} must be in [0, process_count='
                         f'{process_count}).')
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f'global batch size {global_batch_size} must be a positive multiple of '
                         f'the process count {process_count}; change the batch size.')
    return process_index, process_count, global_batch_size // process_count


def _derive_seed(*ints) -> int:
    """A well-mixed non-negative 63-bit seed from several ints (e.g. (seed, epoch))."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- sources


def _decode_encoded(encoded):
    """Encoded JPEG/PNG/... bytes -> uint8 (h, w, 3); JPEG with the accurate IDCT, like PIL."""
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE'),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    return image


def _pil_rgb(path) -> np.ndarray:
    with PIL.Image.open(path.decode() if isinstance(path, bytes) else path) as im:
        return np.asarray(im.convert('RGB'))


def _decode_path(path):
    """File path -> uint8 (h, w, 3) via PIL, which handles every mode/format the folder may hold."""
    image = tf.numpy_function(_pil_rgb, [path], tf.uint8, stateful=False)
    image.set_shape([None, None, 3])
    return image


@dataclasses.dataclass
class _Shard:
    """This host's examples of one split, in a reference order.

    `ordered(epoch_seed)` returns a tf.data.Dataset of (key, label): the reference order for
    epoch_seed=None (evaluation), else an order that is a pure function of epoch_seed. `decode`
    maps a key (encoded bytes or a file path) to a uint8 (h, w, 3) image. Hosts' shards differ by
    at most one example (only in evaluation); `largest_shard` is the size of the biggest.
    """
    num_examples: int
    largest_shard: int
    ordered: Callable[[Optional[int]], tf.data.Dataset]
    decode: Callable


def _in_memory_shard(keys: np.ndarray, labels: np.ndarray, decode, largest_shard) -> _Shard:
    keys_t = tf.constant(keys)
    labels = np.asarray(labels, np.int32)

    def ordered(epoch_seed):
        order = (np.arange(len(labels)) if epoch_seed is None
                 else np.random.default_rng(epoch_seed).permutation(len(labels)))
        return tf.data.Dataset.from_tensor_slices((tf.gather(keys_t, order), labels[order]))

    return _Shard(len(labels), largest_shard, ordered, decode)


def _tfds_builder(cfg, require_prepared: bool = True):
    name, data_dir = cfg.name, cfg.data_dir or None
    if cfg.source == 'synthetic':
        logging.info('Using the synthetic dataset (generated on first use) in %s', data_dir)
        return synthetic_data.get_builder(data_dir, cfg.synthetic_seed, cfg.synthetic_train_size,
                                          cfg.synthetic_test_size)
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f'data.name={name!r} is not a TFDS dataset; see '
                         'https://www.tensorflow.org/datasets/catalog, or use '
                         "source='folder' for your own images.") from None
    if require_prepared and not builder.is_prepared():
        where = data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
        if name.split(':')[0] == 'imagenet2012':
            how = (f'ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and '
                   f'ILSVRC2012_img_val.tar into {where}/downloads/manual/, then run '
                   f'`tfds build imagenet2012 --data_dir={where}`.')
        else:
            how = (f'Prepare it on a machine with internet with `tfds build {name} '
                   f'--data_dir=<dir>` and copy <dir>/{name.split(":")[0]} into {where}.')
        raise FileNotFoundError(
            f'TFDS dataset {name!r} is not prepared in data_dir={where!r}. {how}')
    return builder


def _tfds_keys(builder):
    image_key, label_key = builder.info.supervised_keys or ('image', 'label')
    if not isinstance(builder.info.features[image_key], tfds.features.Image):
        raise ValueError(f'{builder.name}: feature {image_key!r} is not an image.')
    return image_key, label_key


def _tfds_shard(cfg, split, process_index, process_count, *, drop_remainder) -> _Shard:
    builder = _tfds_builder(cfg)
    image_key, label_key = _tfds_keys(builder)
    splits = builder.info.splits
    try:
        split_examples = splits[split].num_examples  # Also parses slices like 'train[:90%]'.
    except (KeyError, ValueError) as e:
        raise ValueError(f'{builder.name}: bad split {split!r} ({e}); it has splits '
                         f'{list(splits)}. Set data.train_split / data.eval_split.') from None
    host_split = tfds.even_splits(split, n=process_count,
                                  drop_remainder=drop_remainder)[process_index]
    num_examples = splits[host_split].num_examples
    largest_shard = num_examples if drop_remainder else -(-split_examples // process_count)
    decoders = {image_key: tfds.decode.SkipDecoding()}  # Decode after skipping, in our own map.
    options = tf.data.Options()
    options.deterministic = True

    def read(shuffle_seed):
        read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False,
                                      options=options)
        ds = builder.as_dataset(split=host_split, shuffle_files=shuffle_seed is not None,
                                decoders=decoders, read_config=read_config)
        return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))

    # TFDS knows the bytes of whole splits only; sliced splits get the dataset's average.
    mb_per_example = (sum(int(s.num_bytes) for s in splits.values()) / 2**20
                      / max(sum(s.num_examples for s in splits.values()), 1))
    host_mb = mb_per_example * num_examples
    if 0 < host_mb <= cfg.in_memory_max_mb:
        keys, labels = [], []
        for k, l in read(None).batch(4096).as_numpy_iterator():
            keys.append(k)
            labels.append(l)
        return _in_memory_shard(np.concatenate(keys), np.concatenate(labels), _decode_encoded,
                                largest_shard)

    logging.info('Streaming %s %s (%.0f MB per host) with a %d-example shuffle buffer.',
                 builder.name, host_split, host_mb, cfg.shuffle_buffer)

    def ordered(epoch_seed):
        ds = read(epoch_seed)
        if epoch_seed is not None:
            ds = ds.shuffle(cfg.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        return ds

    return _Shard(num_examples, largest_shard, ordered, _decode_encoded)


def _folder_classes(root) -> list:
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f'image folder {str(root)!r} does not exist; set data.folder to a '
                                'directory with one subfolder of images per class.')
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
    if not classes:
        raise ValueError(f'image folder {str(root)!r} has no class subfolders; expected '
                         f'{root}/<class_name>/<image files>.')
    return classes


def _is_readable_image(path: str) -> bool:
    """Fully decodes once: catches truncated files and non-images that merely have the extension."""
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return im.width > 0 and im.height > 0
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...).
        return False


def _index_folder(root, classes):
    """All readable images under root/<class>/ (recursively) with their labels, sorted by path."""
    root = pathlib.Path(root).expanduser()
    candidates = []
    for label, name in enumerate(classes):
        class_dir = root / name
        if not class_dir.is_dir():
            continue  # An eval folder may hold only some of the classes.
        for path in sorted(class_dir.rglob('*')):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                candidates.append((str(path), label))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL decodes without GIL.
        readable = list(pool.map(_is_readable_image, [p for p, _ in candidates]))
    bad = [p for (p, _), ok in zip(candidates, readable) if not ok]
    if bad:
        warnings.warn(f'Skipped {len(bad)} of {len(candidates)} image files in {root} that could '
                      f'not be decoded: {bad[:5]}{" ..." if len(bad) > 5 else ""}')
    good = [c for c, ok in zip(candidates, readable) if ok]
    if not good:
        raise ValueError(f'no readable images ({"/".join(IMAGE_EXTENSIONS)}) in the class '
                         f'subfolders of {str(root)!r}.')
    paths, labels = zip(*good)
    return np.array(paths, dtype=object), np.array(labels, np.int32)


def _folder_shard(cfg, train, process_index, process_count) -> _Shard:
    classes = _folder_classes(cfg.folder)
    root = cfg.folder if train or not cfg.eval_folder else cfg.eval_folder
    if root != cfg.folder:
        unknown = sorted(set(_folder_classes(root)) - set(classes))
        if unknown:
            raise ValueError(f'eval folder {root!r} has classes {unknown} that the training '
                             f'folder {cfg.folder!r} does not have.')
    paths, labels = _index_folder(root, classes)
    # Files are sorted by class, so mix them (fixed seed) before cutting host shards.
    mix = np.random.default_rng(0).permutation(len(paths))
    paths, labels = paths[mix], labels[mix]
    # Like TFDS even_splits: equal shards for training (remainder dropped); for evaluation
    # nothing is dropped and the first `len % process_count` hosts get one example more.
    sizes = [len(paths) // process_count] * process_count
    if not train:
        sizes = [len(a) for a in np.array_split(np.arange(len(paths)), process_count)]
    start = sum(sizes[:process_index])
    part = slice(start, start + sizes[process_index])
    return _in_memory_shard(paths[part], labels[part], _decode_path, max(sizes))


def _shard(cfg, train, process_index, process_count) -> _Shard:
    if cfg.source == 'folder':
        return _folder_shard(cfg, train, process_index, process_count)
    split = cfg.train_split if train else cfg.eval_split
    return _tfds_shard(cfg, split, process_index, process_count, drop_remainder=train)


def num_classes(data_config) -> int:
    """Number of classes of the configured dataset (without preparing or indexing images)."""
    data_config = _resolve(data_config)
    if data_config.source == 'synthetic':
        return synthetic_data.NUM_CLASSES
    if data_config.source == 'folder':
        return len(_folder_classes(data_config.folder))
    builder = _tfds_builder(data_config, require_prepared=False)
    return builder.info.features[_tfds_keys(builder)[1]].num_classes


# ----------------------------------------------------------------------------- preprocessing


def _resize_short_side(image, size: int):
    """torchvision Resize(size), Lanczos: short side -> size, long -> int(size * long / short)."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    long_side = size * tf.maximum(h, w) // tf.minimum(h, w)
    new_h = tf.where(h <= w, size, long_side)
    new_w = tf.where(h <= w, long_side, size)
    image = tf.image.resize(tf.cast(image, tf.float32), tf.stack([new_h, new_w]),
                            method='lanczos3', antialias=True)
    return tf.round(tf.clip_by_value(image, 0.0, 255.0))  # PIL's resize returns uint8.


def _center_crop(image, size: int):
    """torchvision CenterCrop: offset round((h - size) / 2), with round-half-to-even like Python."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top = tf.cast(tf.round(tf.cast(h - size, tf.float32) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(w - size, tf.float32) / 2), tf.int32)
    return image[top:top + size, left:left + size]


def _to_model_range(image):
    return image * (2.0 / 255.0) - 1.0


def _train_preprocess(cfg, epoch_seed: int, decode):
    """(position in the epoch, key, label) -> example; the randomness depends on nothing else."""
    size = cfg.image_size
    mid = round(cfg.resize_ratio * size)  # Python round, as the official code.

    def fn(position, key_and_label):
        key, label = key_and_label
        seed = tf.stack([tf.constant(epoch_seed, tf.int64), position])
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = _resize_short_side(decode(key), mid)
        image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_seed)
        if cfg.random_flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        return {'image': _to_model_range(image), 'label': label}

    return fn


def _eval_preprocess(cfg, decode):
    def fn(key, label):
        image = _resize_short_side(decode(key), round(cfg.resize_ratio * cfg.image_size))
        image = _center_crop(image, cfg.image_size)
        image.set_shape([cfg.image_size, cfg.image_size, 3])
        return {'image': _to_model_range(image), 'label': label}

    return fn


# ----------------------------------------------------------------------------- iterators


def make_train_iterator(data_config, global_batch_size: int, *, seed: int, start_step: int = 0,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> Iterator[dict]:
    """Infinite iterator of this host's training batches, starting at global step `start_step`.

    Yields {'image': float32 (b, R, R, 3) in [-1, 1], 'label': int32 (b,)} with
    b = global_batch_size // process_count. The batch at step s depends only on
    (data_config, seed, s, process_index, process_count): see the module docstring.
    """
    data_config = _resolve(data_config)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be a non-negative int, got {seed!r}.')
    if start_step < 0:
        raise ValueError(f'start_step must be >= 0, got {start_step}.')
    process_index, process_count, batch = _process_layout(
        global_batch_size, process_index, process_count)
    shard = _shard(data_config, True, process_index, process_count)
    steps_per_epoch = shard.num_examples // batch
    if steps_per_epoch == 0:
        raise ValueError(f'this host has {shard.num_examples} training examples, fewer than one '
                         f'per-host batch of {batch}; use a smaller batch or more data.')
    first_epoch, skip_batches = divmod(int(start_step), steps_per_epoch)

    def batches():
        skip = skip_batches
        for epoch in itertools.count(first_epoch):
            epoch_seed = _derive_seed(seed, epoch)
            ds = (shard.ordered(epoch_seed)
                  .take(steps_per_epoch * batch)
                  .enumerate()  # position in the epoch, before skipping: it seeds crop and flip
                  .skip(skip * batch)
                  .map(_train_preprocess(data_config, epoch_seed, shard.decode),
                       num_parallel_calls=tf.data.AUTOTUNE)
                  .batch(batch, drop_remainder=True)
                  .prefetch(2))
            yield from ds.as_numpy_iterator()
            skip = 0

    return batches()


def make_eval_iterator(data_config, global_batch_size: int, *, process_index: Optional[int] = None,
                       process_count: Optional[int] = None) -> Iterator[dict]:
    """Finite iterator over this host's part of the eval split (center crop), in a fixed order.

    Every host yields the same number of batches (collectives need it): partial and missing
    batches are zero-padded, and 'mask' (bool, (b,)) marks the real examples.
    """
    data_config = _resolve(data_config)
    process_index, process_count, batch = _process_layout(
        global_batch_size, process_index, process_count)
    shard = _shard(data_config, False, process_index, process_count)
    num_batches = -(-shard.largest_shard // batch)

    def pad(example, n):
        out = {k: np.zeros((batch,) + v.shape[1:], v.dtype) for k, v in example.items()}
        for k, v in example.items():
            out[k][:n] = v[:n]
        out['mask'] = np.arange(batch) < n
        return out

    def batches():
        size = data_config.image_size
        count = 0
        ds = (shard.ordered(None)
              .map(_eval_preprocess(data_config, shard.decode), num_parallel_calls=tf.data.AUTOTUNE)
              .batch(batch)
              .prefetch(2))
        for example in ds.as_numpy_iterator():
            count += 1
            yield pad(example, len(example['label']))
        empty = {'image': np.zeros((0, size, size, 3), np.float32),
                 'label': np.zeros((0,), np.int32)}
        while count < num_batches:
            count += 1
            yield pad(empty, 0)

    return batches()
