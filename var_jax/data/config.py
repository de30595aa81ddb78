"""Checks the `config.data` settings once, before any file is read.

configs/common.py (`base_config().data`) is the only place that defines the fields and their defaults;
the pipeline takes the given sub-config as it is. This table says what each field must hold, so that a
bad value fails at once with the field's name instead of deep inside tf.data.
"""

from collections.abc import Mapping
from numbers import Real

import ml_collections
import numpy as np

from var_jax.errors import ConfigError

SOURCES = ('tfds', 'folder', 'synthetic')


def _is_int(value, low):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low


def _is_real(value, low):
    return isinstance(value, Real) and not isinstance(value, bool) and value >= low


def _is_text(value):
    return isinstance(value, str) and bool(value)


# field -> (test, what the value must be)
FIELDS = {
    'source': (lambda v: v in SOURCES, f'one of {SOURCES}'),
    'name': (_is_text, "a TFDS dataset name such as 'cifar10' or 'imagenet2012' (source='tfds')"),
    'data_dir': (
        lambda v: v is None or isinstance(v, str),
        'the TFDS data directory, or None for $TFDS_DATA_DIR / ~/tensorflow_datasets',
    ),
    'folder': (lambda v: isinstance(v, str), "a directory with one subfolder of images per class (source='folder')"),
    'eval_folder': (lambda v: isinstance(v, str), "a directory like data.folder, or '' to evaluate on data.folder"),
    'train_split': (_is_text, "a TFDS split such as 'train' or 'train[:90%]'"),
    'eval_split': (_is_text, "a TFDS split such as 'test' or 'validation'"),
    'image_size': (lambda v: _is_int(v, 1), 'a positive int (the training resolution R)'),
    'resize_ratio': (
        lambda v: _is_real(v, 1),
        'a number >= 1 (the short side is resized to round(resize_ratio * R) before the RxR crop)',
    ),
    'random_flip': (lambda v: isinstance(v, (bool, np.bool_)), 'True or False'),
    'shuffle_buffer': (lambda v: _is_int(v, 1), 'a positive int (examples; streamed TFDS splits only)'),
    'in_memory_max_mb': (
        lambda v: _is_real(v, 0),
        'a number >= 0 (TFDS splits up to this encoded size are held in memory; 0 streams every split)',
    ),
    'synthetic_seed': (lambda v: _is_int(v, 0), 'an int >= 0'),
    'synthetic_train_size': (lambda v: _is_int(v, 1), 'a positive int (images)'),
    'synthetic_test_size': (lambda v: _is_int(v, 1), 'a positive int (images)'),
    'pretokenize': (
        lambda v: isinstance(v, (bool, np.bool_)),
        'True (train the transformer on token maps encoded once) or False (encode every batch)',
    ),
    'pretokenize_crops': (
        lambda v: _is_int(v, 1),
        'an int >= 1 (views encoded per image: the center crop, then random crops)',
    ),
}


def validate_config(data_config) -> ml_collections.FrozenConfigDict:
    """The data settings, checked and frozen; one ValueError names every bad data.<field>.

    `data_config` is `config.data` (a ConfigDict or a mapping) with every field of
    `configs.common.base_config().data`: nothing is filled in here.
    """
    if hasattr(data_config, 'to_dict'):
        given = data_config.to_dict()
    elif isinstance(data_config, Mapping):
        given = dict(data_config)
    else:
        raise TypeError(f'the data config must be a ConfigDict or a mapping, got {type(data_config).__name__}.')
    problems = []
    missing = [f for f in FIELDS if f not in given]
    if missing:
        problems.append(
            f'missing {", ".join("data." + f for f in missing)}: build the data config from '
            'configs.common.base_config().data, which defines every field'
        )
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        problems.append(
            f'unknown {", ".join("data." + f for f in unknown)} (check the spelling; the fields are '
            f'{", ".join(FIELDS)})'
        )
    for field, (test, what) in FIELDS.items():
        if field in given and not test(given[field]):
            problems.append(f'data.{field}={given[field]!r} must be {what}')
    if not problems and given['source'] == 'folder' and not given['folder']:
        problems.append("data.source='folder' needs data.folder=<root, one subfolder of images per class>")
    if problems:
        raise ConfigError('Bad data config: ' + '; '.join(problems) + '.')
    return ml_collections.FrozenConfigDict(given)
