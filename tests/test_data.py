"""The data package: config validation, the synthetic dataset, train/eval iterators, resume, host shards, errors.

Everything runs offline on tiny datasets in temporary data_dirs. Image decoding and the official
transform's geometry are in test_data_images.py.
"""

import hashlib
import importlib
import pathlib
import socket

import numpy as np
import PIL.Image
import pytest

from configs.common import base_config
from var_jax import data
from var_jax.data import config as data_config
from var_jax.data import synthetic as sd

TRAIN_SIZE, TEST_SIZE = 600, 131  # 131: the eval split does not divide into batches or hosts.
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A small synthetic dataset, built once for the module."""
    path = tmp_path_factory.mktemp('tfds')
    sd.get_builder(str(path), seed=0, train_size=TRAIN_SIZE, test_size=TEST_SIZE)
    return str(path)


def synthetic_config(data_dir, **overrides):
    cfg = base_config().data
    cfg.update(dict(data_dir=data_dir, synthetic_train_size=TRAIN_SIZE, synthetic_test_size=TEST_SIZE), **overrides)
    return cfg


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def digests(images):
    return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


def all_split_digests(cfg, split):
    """Digests of every image of a split, read by the eval iterator without resizing."""
    cfg = cfg.copy_and_resolve_references()
    cfg.update(eval_split=split, resize_ratio=1.0)
    out = []
    for batch in data.make_eval_iterator(cfg, 128, process_index=0, process_count=1):
        out += digests(batch['image'][batch['mask']])
    return out


# ----------------------------------------------------------------------------- synthetic data


def read_split(builder, split):
    import tensorflow_datasets as tfds

    examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
    return (np.stack([e['image'] for e in examples]), np.array([e['label'] for e in examples]))


def test_synthetic_dataset_builds_offline_and_is_deterministic(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError('building the synthetic dataset tried to use the network')

    monkeypatch.setattr(socket.socket, 'connect', no_network)
    builds = [
        sd.get_builder(str(tmp_path / name), seed=seed, train_size=50, test_size=20)
        for name, seed in (('a', 7), ('b', 7), ('c', 8))
    ]
    assert all(b.info.splits['train'].num_examples == 50 for b in builds)
    assert builds[0].info.splits['test'].num_examples == 20
    assert builds[0].info.features['label'].num_classes == sd.NUM_CLASSES >= 10
    images_a, labels_a = read_split(builds[0], 'train')
    images_b, labels_b = read_split(builds[1], 'train')
    images_c, _ = read_split(builds[2], 'train')
    assert images_a.shape == (50, 32, 32, 3) and images_a.dtype == np.uint8
    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert np.abs(images_a.astype(int) - images_c).mean() > 20  # another seed, other images
    # The stored images are exactly what the generator draws.
    generated, generated_labels = sd.generate_split(7, 0, 50)
    assert sorted(digests(generated)) == sorted(digests(images_a))
    assert np.bincount(generated_labels, minlength=10).tolist() == [5] * 10


def test_synthetic_classes_are_recognisable():
    """A nearest-centroid rule on translation-invariant features tells the classes apart."""

    def features(images):
        gray = images.astype(np.float64).mean(-1)
        gray -= gray.mean((1, 2), keepdims=True)
        gray /= gray.std((1, 2), keepdims=True) + 1e-6
        return np.abs(np.fft.fft2(gray)).reshape(len(images), -1)

    train_images, train_labels = sd.generate_split(0, 0, 2000)
    test_images, test_labels = sd.generate_split(0, 1, 500)
    centroids = np.stack([features(train_images[train_labels == c]).mean(0) for c in range(sd.NUM_CLASSES)])
    distances = ((features(test_images)[:, None] - centroids[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == test_labels).mean()
    assert accuracy > 0.9, accuracy
    # Per-class mean images differ pairwise too (the classes are not one pattern recoloured).
    means = np.stack([train_images[train_labels == c].astype(np.float64).mean(0) for c in range(sd.NUM_CLASSES)])
    gaps = np.abs(means[:, None] - means[None]).mean((2, 3, 4))
    assert gaps[~np.eye(sd.NUM_CLASSES, dtype=bool)].min() > 1.0
    # Within a class, images vary (position/size/colour jitter): no memorisable duplicates.
    assert len(set(digests(train_images))) == len(train_images)


def test_default_config_builds_the_synthetic_dataset(tmp_path):
    cfg = base_config().data
    cfg.data_dir = str(tmp_path)
    assert data.num_classes(cfg) == 10
    batch = next(data.make_train_iterator(cfg, 8, seed=0, process_index=0, process_count=1))
    assert batch['image'].shape == (8, 32, 32, 3)
    builder = sd.get_builder(str(tmp_path))
    assert builder.info.splits['train'].num_examples == 10000
    assert builder.info.splits['test'].num_examples == 1000


# ----------------------------------------------------------------------------- train iterator


@pytest.mark.parametrize('image_size', [32, 24])
def test_train_batches_shapes_dtypes_range(data_dir, image_size):
    cfg = synthetic_config(data_dir, image_size=image_size)
    batches = take(data.make_train_iterator(cfg, 16, seed=0, process_index=0, process_count=1), 2)
    for batch in batches:
        assert set(batch) == {'image', 'label'}
        assert batch['image'].shape == (16, image_size, image_size, 3)
        assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
        assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
        assert batch['image'].min() < -0.5 and batch['image'].max() > 0.5  # uses the range
        # Values come from uint8 pixels: (x + 1) * 127.5 is an integer, as in the official code.
        pixels = (batch['image'] + 1) * 127.5
        np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
        assert ((batch['label'] >= 0) & (batch['label'] < 10)).all()
    assert not np.array_equal(batches[0]['label'], batches[1]['label'])


@pytest.mark.parametrize('in_memory_max_mb', [1024, 0], ids=['in_memory', 'streaming'])
def test_resume_reproduces_batches_exactly(data_dir, in_memory_max_mb):
    cfg = synthetic_config(data_dir, in_memory_max_mb=in_memory_max_mb)
    kwargs = dict(seed=3, process_index=0, process_count=1)
    batch = 64  # 600 examples -> 9 steps per epoch; steps 8..10 cross an epoch boundary.
    reference = take(data.make_train_iterator(cfg, batch, **kwargs), 11)
    for start in (3, 8):
        resumed = take(data.make_train_iterator(cfg, batch, start_step=start, **kwargs), 3)
        for offset, got in enumerate(resumed):
            want = reference[start + offset]
            np.testing.assert_array_equal(got['image'], want['image'])
            np.testing.assert_array_equal(got['label'], want['label'])
    # The order really depends on the seed and the epoch (a constant pipeline would pass above).
    other_seed = next(data.make_train_iterator(cfg, batch, **{**kwargs, 'seed': 4}))
    assert not np.array_equal(other_seed['image'], reference[0]['image'])
    assert not np.array_equal(reference[0]['label'], reference[9]['label'])  # epochs 0 and 1


@pytest.mark.parametrize('in_memory_max_mb', [1024, 0], ids=['in_memory', 'streaming'])
def test_epoch_is_a_permutation_and_hosts_are_disjoint(data_dir, in_memory_max_mb):
    # resize_ratio=1 makes train preprocessing the identity on 32x32 images, so a training image
    # can be matched with its dataset image.
    cfg = synthetic_config(data_dir, in_memory_max_mb=in_memory_max_mb, resize_ratio=1.0)
    dataset = set(all_split_digests(cfg, 'train'))
    assert len(dataset) == TRAIN_SIZE
    per_host = []
    for host in (0, 1):
        it = data.make_train_iterator(cfg, 100, seed=0, process_index=host, process_count=2)
        seen = [d for b in take(it, 6) for d in digests(b['image'])]  # 300 // 50 = 6 steps/epoch
        assert len(set(seen)) == len(seen) == 300  # no example twice within an epoch
        per_host.append(set(seen))
    assert not per_host[0] & per_host[1]
    assert per_host[0] | per_host[1] == dataset


def test_in_memory_limit_switches_to_streaming(data_dir):
    """The two readers order examples differently, so the switch visibly takes effect."""
    first = [
        next(
            data.make_train_iterator(
                synthetic_config(data_dir, in_memory_max_mb=mb), 16, seed=0, process_index=0, process_count=1
            )
        )['label']
        for mb in (1024, 0)
    ]
    assert not np.array_equal(*first)


def test_random_flip_switch(data_dir):
    cfg = synthetic_config(data_dir, resize_ratio=1.0)
    kwargs = dict(seed=5, process_index=0, process_count=1)
    plain = next(data.make_train_iterator(cfg, 64, **kwargs))['image']
    cfg.random_flip = True
    flipped = next(data.make_train_iterator(cfg, 64, **kwargs))['image']
    same = [np.array_equal(a, b) for a, b in zip(plain, flipped)]
    mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(plain, flipped)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54  # about half are flipped


# ----------------------------------------------------------------------------- eval iterator


def test_eval_iterator_pads_and_masks(data_dir):
    cfg = synthetic_config(data_dir)
    batches = list(data.make_eval_iterator(cfg, 64, process_index=0, process_count=1))
    assert [int(b['mask'].sum()) for b in batches] == [64, 64, 3]
    last = batches[-1]
    assert last['image'].shape == (64, 32, 32, 3) and last['mask'].dtype == np.bool_
    assert last['mask'][:3].all() and not (last['image'][3:]).any()
    assert (last['label'][3:] == 0).all()
    again = list(data.make_eval_iterator(cfg, 64, process_index=0, process_count=1))
    np.testing.assert_array_equal(again[0]['image'], batches[0]['image'])  # fixed order and crop

    # Two hosts: 66 and 65 examples; both yield the same number of batches.
    real = []
    for host in (0, 1):
        host_batches = list(data.make_eval_iterator(cfg, 64, process_index=host, process_count=2))
        assert [int(b['mask'].sum()) for b in host_batches] == [[32, 32, 2], [32, 32, 1]][host]
        real += [d for b in host_batches for d in digests(b['image'][b['mask']])]
    assert len(set(real)) == TEST_SIZE


# ----------------------------------------------------------------------------- config and errors


def test_every_data_field_has_one_default_in_base_config():
    """configs/common.py defines exactly the fields the pipeline reads, so lock_config accepts each of them."""
    config = base_config()
    assert sorted(config.data.keys()) == sorted(data_config.FIELDS)
    data.validate_config(config.data)
    config.lock()
    for field, value in dict(eval_folder='/e', shuffle_buffer=7, in_memory_max_mb=0, synthetic_seed=3).items():
        setattr(config.data, field, value)  # what --config.data.<field>=... does
    assert data.validate_config(config.data).shuffle_buffer == 7
    for path in sorted((ROOT / 'configs').glob('*.py')):  # every shipped config's data settings are valid
        if path.name != 'common.py':
            cfg = importlib.import_module(f'configs.{path.stem}').get_config().data
            if cfg.source == 'folder':
                cfg.folder = '/images'  # the one field a user must give (--config.data.folder)
            data.validate_config(cfg)


def test_bad_data_config_names_the_field(data_dir):
    kwargs = dict(seed=0, process_index=0, process_count=1)
    partial = {k: v for k, v in synthetic_config(data_dir).items() if k not in ('shuffle_buffer', 'synthetic_seed')}
    missing = r'missing data\.shuffle_buffer, data\.synthetic_seed: .*base_config\(\)\.data'
    with pytest.raises(ValueError, match=missing):
        data.make_train_iterator(partial, 8, **kwargs)
    with pytest.raises(ValueError, match=r'unknown data\.shufle_buffer \(check the spelling'):
        data.make_eval_iterator(dict(synthetic_config(data_dir), shufle_buffer=4), 8, process_index=0, process_count=1)
    bad = dict(
        source='imagenet',
        image_size=0,
        resize_ratio=0.5,
        random_flip='yes',
        shuffle_buffer=0,
        in_memory_max_mb=-1,
        synthetic_seed=-1,
        synthetic_train_size=True,
        data_dir=3,
        name='',
    )
    for field, value in bad.items():
        with pytest.raises(ValueError, match=rf'Bad data config: data\.{field}={value!r} must be '):
            data.make_train_iterator(dict(synthetic_config(data_dir), **{field: value}), 8, **kwargs)
    with pytest.raises(ValueError, match=r'data\.image_size=-32 .*; data\.resize_ratio=0\.9 '):  # all at once
        data.num_classes(synthetic_config(data_dir, image_size=-32, resize_ratio=0.9))
    with pytest.raises(ValueError, match=r"source='folder' needs data\.folder"):
        data.num_classes(synthetic_config(data_dir, source='folder'))
    with pytest.raises(TypeError, match='ConfigDict or a mapping'):
        data.validate_config(['source'])


def test_clear_errors_for_bad_input(tmp_path, data_dir):
    kwargs = dict(seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match='multiple of the process count 3'):
        data.make_train_iterator(synthetic_config(data_dir), 8, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match='multiple of the process count 3'):
        data.make_eval_iterator(synthetic_config(data_dir), 10, process_index=1, process_count=3)

    folder_cfg = synthetic_config(data_dir, source='folder', folder=str(tmp_path / 'missing'))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        data.make_train_iterator(folder_cfg, 8, **kwargs)
    (tmp_path / 'flat').mkdir()
    PIL.Image.new('RGB', (8, 8)).save(tmp_path / 'flat' / 'loose.png')
    folder_cfg.folder = str(tmp_path / 'flat')
    with pytest.raises(ValueError, match='no class subfolders'):
        data.make_train_iterator(folder_cfg, 8, **kwargs)
    (tmp_path / 'broken' / 'cls').mkdir(parents=True)
    (tmp_path / 'broken' / 'cls' / 'a.png').write_bytes(b'garbage')
    folder_cfg.folder = str(tmp_path / 'broken')
    with pytest.warns(UserWarning), pytest.raises(ValueError, match='no readable images'):
        data.make_train_iterator(folder_cfg, 8, **kwargs)


def test_tfds_errors_say_how_to_prepare(tmp_path):
    cfg = base_config().data
    cfg.update(source='tfds', name='cifar10', data_dir=str(tmp_path))
    assert data.num_classes(cfg) == 10  # known without preparing the dataset
    with pytest.raises(FileNotFoundError, match='tfds build cifar10'):
        data.make_train_iterator(cfg, 8, seed=0, process_index=0, process_count=1)
    cfg.update(name='imagenet2012', eval_split='validation')
    with pytest.raises(FileNotFoundError, match=r'ILSVRC2012_img_train\.tar.*downloads/manual'):
        data.make_eval_iterator(cfg, 8, process_index=0, process_count=1)
    cfg.name = 'no_such_dataset_xyz'
    with pytest.raises(ValueError, match='not a TFDS dataset'):
        data.num_classes(cfg)


def test_sliced_split_and_bad_split(data_dir):
    cfg = synthetic_config(data_dir, train_split='train[:100]+test[:28]', resize_ratio=1.0)
    it = data.make_train_iterator(cfg, 64, seed=0, process_index=0, process_count=1)
    seen = set(d for b in take(it, 2) for d in digests(b['image']))  # one epoch: 2 steps
    expected = all_split_digests(cfg, 'train')[:100] + all_split_digests(cfg, 'test')[:28]
    assert seen == set(expected)
    with pytest.raises(ValueError, match="bad split 'validation'.*train_split / data.eval_split"):
        data.make_eval_iterator(
            synthetic_config(data_dir, eval_split='validation'), 8, process_index=0, process_count=1
        )


def test_process_layout_defaults_to_jax(data_dir):
    batch = next(data.make_train_iterator(synthetic_config(data_dir, image_size=16), 4, seed=0))
    assert batch['image'].shape == (4, 16, 16, 3)


def test_hiding_accelerators_from_tensorflow_is_a_call_not_an_import_side_effect(monkeypatch):
    import tensorflow as tf

    calls = []
    monkeypatch.setattr(tf.config, 'set_visible_devices', lambda *args, **kwargs: calls.append((args, kwargs)))
    for name in ('config', 'preprocessing', 'sources', 'iterators'):  # run their module code again
        importlib.reload(importlib.import_module(f'var_jax.data.{name}'))
    importlib.reload(data)
    assert not calls, f'importing changed what TensorFlow sees: {calls}'
    assert data.hide_accelerators_from_tensorflow() is True
    assert len(calls) == 1, calls
    (devices,), kwargs = calls[0]
    assert not kwargs and devices and {d.device_type for d in devices} == {'CPU'}, calls
