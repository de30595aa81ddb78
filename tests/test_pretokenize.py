"""Pre-tokenised training data (data.pretokenize): the token cache, its iterator and the token-batch step.

One tiny synthetic dataset (40 images of 32 px, trained at 8 px from a 12-px resize, so random crops have 25
offsets), the tiny VQVAE / VAR of tests/train_worker.py, 3 views per image with flips (6 entries) and
16-image shards (3 shard files), all built once per module.
"""

import concurrent.futures
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs.common import base_config
from var_jax import checkpoint, preflight
from var_jax.data import preprocessing, sources, synthetic, tokens
from var_jax.models.vqvae import VQVAE
from var_jax.trainers import loop, transformer

import train_worker

TRAIN, TEST, CROPS, SEED = 40, 8, 3, 5
SHARD = 16


def data_config(data_dir, **overrides):
    cfg = base_config().data
    cfg.update(
        dict(
            data_dir=data_dir,
            synthetic_train_size=TRAIN,
            synthetic_test_size=TEST,
            image_size=8,
            resize_ratio=1.5,
            random_flip=True,
            pretokenize=True,
            pretokenize_crops=CROPS,
        ),
        **overrides,
    )
    return cfg


class Encoder:
    """Wraps an encoder: counts the images it is given; can fail after some calls (a killed build) or shift
    every token id (a different tokenizer) without compiling another one."""

    def __init__(self, inner, fail_after=None, shift=0):
        self.inner, self.fail_after, self.shift, self.calls, self.images = inner, fail_after, shift, 0, 0

    def __call__(self, views):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt('killed')
        self.calls += 1
        self.images += len(views)
        return (self.inner(views) + self.shift) % train_worker.VAE['vocab_size']


def _compile_steps(vqvae, var, tx, vae_params, var_params, weights, pool):
    """Futures of the transformer step compiled for an image batch and for a token batch (the slowest part of
    this module: compiled in threads, overlapping each other and the cache builds)."""
    step = jax.jit(transformer.make_step(vqvae, var, tx, 0.0))
    state = loop.new_state(var_params, tx, 0)
    label = jax.ShapeDtypeStruct((8,), jnp.int32)
    batches = {
        'image': {'image': jax.ShapeDtypeStruct((8, 8, 8, 3), jnp.float32), 'label': label},
        'tokens': {'tokens': jax.ShapeDtypeStruct((8, 21), jnp.int32), 'label': label},
    }
    return state, {
        k: pool.submit(lambda b=b: step.lower(state, vae_params, b, weights).compile()) for k, b in batches.items()
    }


@pytest.fixture(scope='module')
def env(request, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    vqvae, var, tx, vae_params, var_params, _, weights = train_worker.build()
    selected = {item.name for item in request.session.items if getattr(item, 'module', None) is request.module}
    with concurrent.futures.ThreadPoolExecutor(2) as pool, pytest.MonkeyPatch.context() as mp:
        state, steps = (
            _compile_steps(vqvae, var, tx, vae_params, var_params, weights, pool)
            if 'test_token_step_equals_image_step' in selected
            else (None, None)
        )
        synthetic.get_builder(data_dir, seed=0, train_size=TRAIN, test_size=TEST)
        encode = tokens.make_encoder(vqvae, vae_params, per_device=32)
        mp.setattr(tokens, 'SHARD_IMAGES', SHARD)
        env = dict(
            data_dir=data_dir,
            vqvae=vqvae,
            var=var,
            tx=tx,
            vae_params=vae_params,
            var_params=var_params,
            weights=weights,
            encode=encode,
            fingerprint=tokens.tokenizer_fingerprint(vqvae, vae_params),
            base=tmp_path_factory.mktemp('caches'),
            state=state,
            steps=steps,
        )
        env['root'] = str(env['base'] / 'main')
        build(env, env['root'])
        yield env


def build(env, root, cfg=None, encode=None, fingerprint=None, seed=SEED, **layout):
    layout = layout or dict(process_index=0, process_count=1)
    return tokens.build_token_cache(
        cfg or data_config(env['data_dir']),
        root,
        encode or env['encode'],
        fingerprint=fingerprint or env['fingerprint'],
        seq_len=21,
        vocab_size=32,
        seed=seed,
        batch_images=8,
        **layout,
    )


def read_cache(out):
    with open(os.path.join(out, 'manifest.json')) as f:
        shards = json.load(f)['shards']
    return (
        np.concatenate([np.load(os.path.join(out, s['tokens'])) for s in shards]),
        np.concatenate([np.load(os.path.join(out, s['labels'])) for s in shards]),
    )


@pytest.fixture(scope='module')
def img_to_idx(env):
    vqvae = env['vqvae']
    fn = jax.jit(lambda p, x: jnp.concatenate(vqvae.apply({'params': p}, x, method=VQVAE.img_to_idx), axis=1))
    return lambda images: np.asarray(fn(env['vae_params'], np.asarray(images, np.float32)))


@pytest.fixture(scope='module')
def images(env):
    """The training split in its reference order: keys, labels, the 12-px resized uint8 images, the center
    crops (the eval transform) and the views `tokens.view_preprocess` makes, all computed eagerly."""
    cfg = data_config(env['data_dir'])
    shard = sources.shard(tokens.validate_config(cfg), True, 0, 1)
    keys, labels = zip(*shard.ordered(None).as_numpy_iterator())
    resized = [preprocessing.resize_short_side(shard.decode(k), 12).numpy() for k in keys]
    center = [preprocessing.eval_preprocess(cfg, shard.decode)(k, l)['image'].numpy() for k, l in zip(keys, labels)]
    fn = tokens.view_preprocess(cfg, SEED, shard.decode)
    views = [fn(tf.constant(p, tf.int64), (k, l))['views'].numpy() for p, (k, l) in enumerate(zip(keys, labels))]
    return dict(labels=np.array(labels), resized=resized, center=np.stack(center), views=np.stack(views))


def _offset(resized, view):
    """(y, x) of the 8x8 window of `resized` that `view` (in [-1, 1]) is, or None."""
    for y in range(resized.shape[0] - 7):
        for x in range(resized.shape[1] - 7):
            if np.array_equal(preprocessing.to_model_range(resized[y : y + 8, x : x + 8]), view):
                return y, x
    return None


def test_cache_holds_the_tokens_of_the_views(env, images, img_to_idx):
    """Entry 2v is view v (0: the center crop, 1..: random crops of the resized image), entry 2v+1 its mirror;
    the cache holds `img_to_idx` of each, computed here on the fly, and the labels, in the split's order."""
    views = images['views']
    assert views.shape == (TRAIN, 2 * CROPS, 8, 8, 3)
    np.testing.assert_array_equal(views[:, 0], images['center'])
    offsets = []
    for i in range(TRAIN):
        for v in range(CROPS):
            np.testing.assert_array_equal(views[i, 2 * v + 1], views[i, 2 * v][:, ::-1])
            offsets.append(_offset(images['resized'][i], views[i, 2 * v]))
    assert None not in offsets
    assert set(offsets[::CROPS]) == {(2, 2)}  # view 0: centered in the 12 x 12 image
    random_offsets = [o for j, o in enumerate(offsets) if j % CROPS]
    assert len(set(random_offsets)) >= 10  # random crops over the 25 offsets, different per image and view
    assert sum(a != b for a, b in zip(random_offsets[::2], random_offsets[1::2])) >= TRAIN * 3 // 4
    cached, labels = read_cache(os.path.join(env['root'], 'host0000of0001'))
    assert cached.dtype == np.uint16 and cached.shape == (TRAIN, 2 * CROPS, 21)
    np.testing.assert_array_equal(labels, images['labels'])
    expected = img_to_idx(views.reshape(-1, 8, 8, 3)).reshape(TRAIN, 2 * CROPS, 21)
    np.testing.assert_array_equal(cached, expected)
    assert len(np.unique(cached.reshape(-1, 21), axis=0)) > TRAIN  # the views give different token maps


def test_token_step_equals_image_step(env, images):
    """make_step on {'tokens', 'label'} is make_step on {'image', 'label'} of the same view, without an encoder."""
    image_step, token_step = env['steps']['image'].result(), env['steps']['tokens'].result()
    state, vae_params, w = env['state'], env['vae_params'], env['weights']
    cached, _ = read_cache(os.path.join(env['root'], 'host0000of0001'))
    labels = images['labels'][:8] % env['var'].num_classes
    by_image = {'image': images['views'][:8, 3], 'label': labels}  # crop 1, mirrored
    by_tokens = {'tokens': cached[:8, 3].astype(np.int32), 'label': labels}
    new_i, m_i = image_step(state, vae_params, by_image, w)
    new_t, m_t = token_step(state, vae_params, by_tokens, w)
    for k in m_i:
        np.testing.assert_allclose(m_t[k], m_i[k], rtol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), new_t['params'], new_i['params'])
    _, m_other = token_step(state, vae_params, dict(by_tokens, tokens=cached[:8, 2].astype(np.int32)), w)
    assert abs(float(m_other['loss']) - float(m_t['loss'])) > 1e-4  # another view is another loss
    # No encoder in the token step: NaN encoder params change nothing there (the image step's tokens change).
    nan = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            np.full_like(x, np.nan) if jax.tree_util.keystr(path).startswith(("['encoder']", "['quant_conv']")) else x
        ),
        vae_params,
    )
    np.testing.assert_array_equal(token_step(state, nan, by_tokens, w)[1]['loss'], m_t['loss'])
    assert abs(float(image_step(state, nan, by_image, w)[1]['loss']) - float(m_i['loss'])) > 1e-4


def _match(cached, labels, batch):
    """Position in the cache of each example of a batch (its label and tokens are one of that image's entries)."""
    out = []
    for t, l in zip(batch['tokens'], batch['label']):
        hits = [p for p in range(TRAIN) if labels[p] == l and (cached[p] == t).all(-1).any()]
        assert len(hits) == 1, (t, l, hits)
        out.append(hits[0])
    return out


def test_token_iterator_resumes_exactly_and_covers_each_epoch(env):
    cached, labels = read_cache(os.path.join(env['root'], 'host0000of0001'))
    make = lambda start, seed=0: tokens.make_token_iterator(
        env['root'], 8, seed=seed, start_step=start, process_index=0, process_count=1
    )
    it = make(0)
    run = [next(it) for _ in range(15)]  # 5 steps per epoch: 3 epochs
    for b in run:
        assert b['tokens'].dtype == np.int32 and b['tokens'].shape == (8, 21) and b['label'].dtype == np.int32
    for start in (1, 5, 7, 13):
        fresh = next(make(start))
        for k in ('tokens', 'label'):
            np.testing.assert_array_equal(fresh[k], run[start][k])
    entries = []
    for epoch in range(3):
        positions = [p for b in run[5 * epoch : 5 * epoch + 5] for p in _match(cached, labels, b)]
        assert sorted(positions) == list(range(TRAIN))  # every image once per epoch
        entries.append(
            [
                next(e for e in range(2 * CROPS) if (cached[p, e] == t).all())
                for b in run[5 * epoch : 5 * epoch + 5]
                for p, t in zip(_match(cached, labels, b), b['tokens'])
            ]
        )
    assert set(sum(entries, [])) == set(range(2 * CROPS))  # every view and mirror is drawn
    assert entries[0] != entries[1]  # a new draw each epoch
    assert not np.array_equal(next(make(0, seed=1))['tokens'], run[0]['tokens'])


def test_each_host_encodes_its_own_shard(env):
    """Two processes: host p's cache holds the images of host p's shard (the first and second half of the
    split, as TFDS even_splits gives the image iterator); batches are per host."""
    full, labels = read_cache(os.path.join(env['root'], 'host0000of0001'))
    root = str(env['base'] / 'two_hosts')
    for p in range(2):
        out = build(env, root, process_index=p, process_count=2)
        assert out.endswith(f'host000{p}of0002')
        host, host_labels = read_cache(out)
        half = slice(20 * p, 20 * p + 20)
        np.testing.assert_array_equal(host_labels, labels[half])
        np.testing.assert_array_equal(host[:, :2], full[half, :2])  # center crop and mirror; crops are per host
        batch = next(tokens.make_token_iterator(root, 8, seed=0, process_index=p, process_count=2))
        assert batch['tokens'].shape == (4, 21)
        assert set(batch['label']) <= set(host_labels)


def _copy(env, name):
    root = str(env['base'] / name)
    shutil.copytree(env['root'], root)
    return root


def test_a_cache_of_other_settings_is_rebuilt(env, caplog):
    cached, _ = read_cache(os.path.join(env['root'], 'host0000of0001'))
    root = _copy(env, 'changed')
    same = Encoder(env['encode'])
    build(env, root, encode=same)
    assert same.images == 0  # the same settings: reused, nothing encoded
    # Another tokenizer: any change of a param or of the config changes the fingerprint.
    params = jax.tree.map(np.array, env['vae_params'])
    params['quantize']['embedding'][3, 1] += 1e-3
    fp = tokens.tokenizer_fingerprint(env['vqvae'], params)
    assert fp != env['fingerprint']
    assert tokens.tokenizer_fingerprint(env['vqvae'].clone(beta=0.5), env['vae_params']) != env['fingerprint']
    other = Encoder(env['encode'], shift=1)
    with caplog.at_level(logging.WARNING):
        build(env, root, encode=other, fingerprint=fp)
    assert other.images == TRAIN * 2 * CROPS
    assert 'other settings (tokenizer differ); rebuilding' in caplog.text
    np.testing.assert_array_equal(read_cache(os.path.join(root, 'host0000of0001'))[0], (cached + 1) % 32)
    # Data settings that change the pixels, and the crops' seed.
    no_flip = {'random_flip': False}
    for overrides, seed, differ in (
        (no_flip, SEED, 'data.random_flip, entries'),  # each against the previous
        (dict(no_flip, resize_ratio=1.25), SEED, 'data.resize_ratio'),
        (dict(no_flip, resize_ratio=1.25), SEED + 1, 'crop_seed'),
    ):
        caplog.clear()
        enc = Encoder(env['encode'])
        with caplog.at_level(logging.WARNING):
            build(env, root, cfg=data_config(env['data_dir'], **overrides), encode=enc, fingerprint=fp, seed=seed)
        assert enc.images > 0 and f'({differ} differ)' in caplog.text
    enc = Encoder(env['encode'])  # settings that do not change the pixels do not rebuild
    build(
        env,
        root,
        cfg=data_config(
            env['data_dir'], **overrides, shuffle_buffer=7, in_memory_max_mb=0, synthetic_test_size=TEST + 1
        ),
        encode=enc,
        fingerprint=fp,
        seed=SEED + 1,
    )
    assert enc.images == 0


def test_a_killed_build_resumes_after_its_last_shard(env, caplog):
    cached, labels = read_cache(os.path.join(env['root'], 'host0000of0001'))
    root = str(env['base'] / 'killed')
    with pytest.raises(KeyboardInterrupt):
        build(env, root, encode=Encoder(env['encode'], fail_after=3))  # 3 batches of 8: shard 0 is written
    out = os.path.join(root, 'host0000of0001')
    assert sorted(os.listdir(out)) == ['building.json', 'labels_00000.npy', 'tokens_00000.npy']
    with pytest.raises(FileNotFoundError, match='no finished token cache'):
        tokens.make_token_iterator(root, 8, seed=0, process_index=0, process_count=1)
    rest = Encoder(env['encode'])
    build(env, root, encode=rest)
    assert rest.images == (TRAIN - SHARD) * 2 * CROPS  # only what was not written
    got, got_labels = read_cache(out)
    np.testing.assert_array_equal(got, cached)
    np.testing.assert_array_equal(got_labels, labels)
    assert not os.path.exists(os.path.join(out, 'building.json'))
    # An unfinished cache of other settings is not resumed.
    with pytest.raises(KeyboardInterrupt):
        build(env, root + '2', encode=Encoder(env['encode'], fail_after=3), fingerprint='another tokenizer')
    again = Encoder(env['encode'])
    with caplog.at_level(logging.WARNING):
        build(env, root + '2', encode=again)
    assert again.images == TRAIN * 2 * CROPS and 'unfinished token cache' in caplog.text
    np.testing.assert_array_equal(read_cache(os.path.join(root + '2', 'host0000of0001'))[0], cached)


def test_bad_pretokenize_settings_are_named(env, tmp_path):
    for value in (0, -1, 1.5, True, '2'):
        with pytest.raises(ValueError, match=rf'data\.pretokenize_crops={value!r} must be an int >= 1'):
            tokens.validate_config(dict(data_config(env['data_dir']).to_dict(), pretokenize_crops=value))
    with pytest.raises(ValueError, match=r"data\.pretokenize='yes' must be True"):
        tokens.validate_config(dict(data_config(env['data_dir']).to_dict(), pretokenize='yes'))
    with pytest.raises(ValueError, match=r'vae\.vocab_size=70000 > 65536'):
        tokens.build_token_cache(
            data_config(env['data_dir']),
            str(tmp_path),
            env['encode'],
            fingerprint='x',
            seq_len=21,
            vocab_size=70000,
            seed=0,
            process_index=0,
            process_count=1,
        )
    from configs import var_small

    config = var_small.get_config()
    config.data.pretokenize, config.vae.vocab_size = True, 70000
    with pytest.raises(preflight.ConfigError, match=r'data\.pretokenize stores token ids as uint16'):
        preflight.check(config, 'train', str(tmp_path))


def test_pretokenize_changes_only_the_transformer_checkpoints():
    """Turning data.pretokenize on in a workdir keeps the tokenizer's checkpoints resumable; the transformer's
    data changed (crops and their order), so its checkpoints are refused."""
    saved = checkpoint.config_to_dict(base_config())
    config = base_config()
    config.data.update(dict(pretokenize=True, pretokenize_crops=2))
    keys = lambda stage: loop.RESUMABLE_KEYS + loop.OTHER_STAGE_KEYS[stage]
    assert checkpoint.config_diff(saved, checkpoint.config_to_dict(config), keys('tokenizer')) == {}
    assert set(checkpoint.config_diff(saved, checkpoint.config_to_dict(config), keys('transformer'))) == {
        'data.pretokenize',
        'data.pretokenize_crops',
    }


@pytest.mark.slow
def test_transformer_stage_trains_on_the_cache(env, tmp_path, capsys):
    """trainers.run with data.pretokenize: the stage builds the cache in <workdir>/tokens (the same tokens as
    the module's cache of the same settings) and trains on it; asked again, it reuses the cache."""
    from configs import var_small
    from var_jax import trainers

    init = str(tmp_path / 'vae')
    checkpoint.save_pretrained(init, {'vae': checkpoint.model_config(env['vqvae'])}, {'vae': env['vae_params']})
    config = var_small.get_config()
    config.vae.update(train_worker.VAE)
    config.data.update(data_config(env['data_dir']).to_dict())
    config.var.update(dict(depth=1, embed_dim=32, num_heads=2, num_classes=10))
    config.transformer.update(dict(total_steps=3, batch_size=8))
    config.transformer.optim.warmup_steps = 1
    config.update(dict(stages='transformer', init_from=init, seed=SEED, log_every=3, save_every=3, sample_every=100))
    config.eval.update(dict(val_batches=0, train_num_images=0))
    config.sample.update(dict(num_images=2, batch_size=2, ncols=2, top_k=4))
    workdir = str(tmp_path / 'run')
    trainers.run(config, workdir)
    out = capsys.readouterr().out
    assert '[pretokenize] cached 40 images x 6 token maps x 21 tokens' in out and '[transformer] step 3/3' in out
    assert os.path.isdir(checkpoint.export_dir(workdir))
    np.testing.assert_array_equal(
        read_cache(os.path.join(workdir, 'tokens', 'host0000of0001'))[0],
        read_cache(os.path.join(env['root'], 'host0000of0001'))[0],
    )
    vqvae, _ = loop.models_from_config(config, 10)
    batch = next(transformer.pretokenized_batches(config, workdir, vqvae, env['vae_params'])(2))
    assert '[pretokenize]' not in capsys.readouterr().out  # reused, not encoded again
    expected = next(
        tokens.make_token_iterator(env['root'], 8, seed=SEED, start_step=2, process_index=0, process_count=1)
    )
    np.testing.assert_array_equal(batch['tokens'], expected['tokens'])
