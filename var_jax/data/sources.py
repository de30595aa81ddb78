"""Where the examples come from: one host's shard of a split, as (key, label) in a reference order.

* 'tfds': any prepared TFDS dataset by name (cifar10, imagenet2012, ...), read from data.data_dir
  with `try_gcs=False`. Nothing is ever downloaded; a dataset that is not prepared raises
  FileNotFoundError saying how to prepare it.
* 'folder': the user's images in `folder/<class_name>/**/*.{jpg,png,...}`; labels are the indices
  of the sorted class names. Each folder is indexed once per process: every image is opened once,
  so corrupt files are skipped (one warning with the count) instead of failing mid-training, and
  images smaller than the training size are counted (one warning: they will be upscaled).
* 'synthetic': the project's own shapes dataset (`synthetic.py`), a local TFDS dataset generated
  into data_dir on first use, then read like any TFDS dataset.
"""

import concurrent.futures
import dataclasses
import functools
import logging
import os
import pathlib
import warnings
from typing import Callable, Optional

import numpy as np
import PIL.Image
import tensorflow as tf
import tensorflow_datasets as tfds

from var_jax.data import preprocessing, synthetic
from var_jax.data.config import validate_config
from var_jax.errors import ConfigError, MissingFileError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')


@dataclasses.dataclass
class Shard:
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
    select: Optional[Callable[[np.ndarray], tf.data.Dataset]] = None  # in memory: (key, label) of given indices


def _in_memory_shard(keys: np.ndarray, labels: np.ndarray, decode, largest_shard) -> Shard:
    keys_t = tf.constant(keys)
    labels = np.asarray(labels, np.int32)

    def select(order):
        return tf.data.Dataset.from_tensor_slices((tf.gather(keys_t, order), labels[order]))

    def ordered(epoch_seed):
        return select(
            np.arange(len(labels)) if epoch_seed is None else np.random.default_rng(epoch_seed).permutation(len(labels))
        )

    return Shard(len(labels), largest_shard, ordered, decode, select)


# ----------------------------------------------------------------------------- TFDS and synthetic


def _tfds_builder(cfg, require_prepared: bool = True):
    name, data_dir = cfg.name, cfg.data_dir or None
    if cfg.source == 'synthetic':
        logging.info('Using the synthetic dataset (generated on first use) in %s', data_dir)
        return synthetic.get_builder(data_dir, cfg.synthetic_seed, cfg.synthetic_train_size, cfg.synthetic_test_size)
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(
            f'data.name={name!r} is not a TFDS dataset; see '
            'https://www.tensorflow.org/datasets/catalog, or use '
            "source='folder' for your own images."
        ) from None
    if require_prepared and not builder.is_prepared():
        where = data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
        if name.split(':')[0] == 'imagenet2012':
            how = (
                f'ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and '
                f'ILSVRC2012_img_val.tar into {where}/downloads/manual/, then run '
                f'`tfds build imagenet2012 --data_dir={where}`.'
            )
        else:
            how = (
                f'Prepare it on a machine with internet with `tfds build {name} '
                f'--data_dir=<dir>` and copy <dir>/{name.split(":")[0]} into {where}.'
            )
        raise MissingFileError(f'TFDS dataset {name!r} is not prepared in data_dir={where!r}. {how}')
    return builder


def _tfds_keys(builder):
    image_key, label_key = builder.info.supervised_keys or ('image', 'label')
    if not isinstance(builder.info.features[image_key], tfds.features.Image):
        raise ConfigError(f'{builder.name}: feature {image_key!r} is not an image.')
    return image_key, label_key


def _tfds_shard(cfg, split, process_index, process_count, *, drop_remainder) -> Shard:
    builder = _tfds_builder(cfg)
    image_key, label_key = _tfds_keys(builder)
    splits = builder.info.splits
    try:
        split_examples = splits[split].num_examples  # Also parses slices like 'train[:90%]'.
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f'{builder.name}: bad split {split!r} ({e}); it has splits '
            f'{list(splits)}. Set data.train_split / data.eval_split.'
        ) from None
    host_split = tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]
    num_examples = splits[host_split].num_examples
    largest_shard = num_examples if drop_remainder else -(-split_examples // process_count)
    decoders = {image_key: tfds.decode.SkipDecoding()}  # Decode after skipping, in our own map.
    options = tf.data.Options()
    options.deterministic = True

    def read(shuffle_seed):
        read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False, options=options)
        ds = builder.as_dataset(
            split=host_split, shuffle_files=shuffle_seed is not None, decoders=decoders, read_config=read_config
        )
        return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))

    # TFDS knows the bytes of whole splits only; sliced splits get the dataset's average.
    mb_per_example = (
        sum(int(s.num_bytes) for s in splits.values()) / 2**20 / max(sum(s.num_examples for s in splits.values()), 1)
    )
    host_mb = mb_per_example * num_examples
    if 0 < host_mb <= cfg.in_memory_max_mb:
        keys, labels = [], []
        for k, l in read(None).batch(4096).as_numpy_iterator():
            keys.append(k)
            labels.append(l)
        return _in_memory_shard(
            np.concatenate(keys), np.concatenate(labels), preprocessing.decode_encoded, largest_shard
        )

    logging.info(
        'Streaming %s %s (%.0f MB per host) with a %d-example shuffle buffer.',
        builder.name,
        host_split,
        host_mb,
        cfg.shuffle_buffer,
    )

    def ordered(epoch_seed):
        ds = read(epoch_seed)
        if epoch_seed is not None:
            ds = ds.shuffle(cfg.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        return ds

    return Shard(num_examples, largest_shard, ordered, preprocessing.decode_encoded)


# ----------------------------------------------------------------------------- image folders


def folder_classes(root) -> list:
    """The sorted class subfolder names of an image folder."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise MissingFileError(
            f'image folder {str(root)!r} does not exist; set data.folder to a '
            'directory with one subfolder of images per class.'
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
    if not classes:
        raise ConfigError(
            f'image folder {str(root)!r} has no class subfolders; expected {root}/<class_name>/<image files>.'
        )
    return classes


def _image_size(path: str) -> Optional[tuple]:
    """(width, height) after a full decode (catches truncated files and non-images), or None."""
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return im.size if im.width > 0 and im.height > 0 else None
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...).
        return None


def _listing(paths) -> str:
    return f'{list(paths[:5])}{" ..." if len(paths) > 5 else ""}'


@functools.lru_cache(maxsize=16)
def _index_folder(root: str, classes: tuple, image_size: int):
    """All readable images under root/<class>/ (recursively) with their labels, sorted by path.

    Cached, so a run decodes every file once and warns once, however many iterators it makes.
    """
    candidates = []
    for label, name in enumerate(classes):
        class_dir = pathlib.Path(root) / name
        if not class_dir.is_dir():
            continue  # An eval folder may hold only some of the classes.
        for path in sorted(class_dir.rglob('*')):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                candidates.append((str(path), label))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL decodes without GIL.
        sizes = list(pool.map(_image_size, [p for p, _ in candidates]))
    bad = [p for (p, _), size in zip(candidates, sizes) if size is None]
    if bad:
        warnings.warn(
            f'Skipped {len(bad)} of {len(candidates)} image files in {root} that could not be decoded: {_listing(bad)}'
        )
    small = [p for (p, _), size in zip(candidates, sizes) if size is not None and min(size) < image_size]
    if small:
        warnings.warn(
            f'{len(small)} of {len(candidates) - len(bad)} images in {root} have a short side below '
            f'the training size data.image_size={image_size} and are upscaled: {_listing(small)}'
        )
    good = [c for c, size in zip(candidates, sizes) if size is not None]
    if not good:
        raise ConfigError(f'no readable images ({"/".join(IMAGE_EXTENSIONS)}) in the class subfolders of {root!r}.')
    paths = np.array([path for path, _ in good], dtype=object)
    labels = np.array([label for _, label in good], np.int32)
    paths.setflags(write=False)  # shared by every caller of the cache
    labels.setflags(write=False)
    return paths, labels


def _folder_shard(cfg, train, process_index, process_count) -> Shard:
    classes = folder_classes(cfg.folder)
    root = cfg.folder if train or not cfg.eval_folder else cfg.eval_folder
    if root != cfg.folder:
        unknown = sorted(set(folder_classes(root)) - set(classes))
        if unknown:
            raise ConfigError(
                f'eval folder {root!r} has classes {unknown} that the training folder {cfg.folder!r} does not have.'
            )
    paths, labels = _index_folder(str(pathlib.Path(root).expanduser().resolve()), tuple(classes), cfg.image_size)
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
    return _in_memory_shard(paths[part], labels[part], preprocessing.decode_path, max(sizes))


# ----------------------------------------------------------------------------- entry points


def shard(cfg, train: bool, process_index: int, process_count: int) -> Shard:
    """This host's shard of the training (train=True) or evaluation split of validated settings."""
    if cfg.source == 'folder':
        return _folder_shard(cfg, train, process_index, process_count)
    split = cfg.train_split if train else cfg.eval_split
    return _tfds_shard(cfg, split, process_index, process_count, drop_remainder=train)


def num_classes(data_config) -> int:
    """Number of classes of the configured dataset (without preparing or indexing images)."""
    cfg = validate_config(data_config)
    if cfg.source == 'synthetic':
        return synthetic.NUM_CLASSES
    if cfg.source == 'folder':
        return len(folder_classes(cfg.folder))
    builder = _tfds_builder(cfg, require_prepared=False)
    return builder.info.features[_tfds_keys(builder)[1]].num_classes
