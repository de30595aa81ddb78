"""Pre-tokenised training data (`data.pretokenize`): the frozen tokenizer's token maps, encoded once.

Why: with images, every transformer step runs the frozen 256-px VQVAE encoder (on TPU a large share of the
step's FLOPs and most of its compile time). With a token cache the step reads token maps instead.

Views. Each training image is stored as `data.pretokenize_crops` views: view 0 is the eval-style center
crop, views 1.. are random RxR crops of the same resized image (the train transform's resize and crop),
seeded by (seed, position of the image in this host's shard, view) only. With `data.random_flip` every
view is also stored horizontally flipped, right after it: entry e = 2 * view + flipped (else e = view).
Each epoch the iterator picks one entry per image, a pure function of (seed, epoch, position).

Layout under `<cache_root>/host<p>of<P>/` (one directory per process: each host encodes its own shard of
the split, the one the image iterator reads, `sources.shard`):
  * tokens_<k>.npy: uint16 (n, entries, L), the token ids of all scales concatenated (coarse to fine);
    labels_<k>.npy: int32 (n,), for images [k * SHARD_IMAGES, k * SHARD_IMAGES + n) in the reference order;
  * building.json: the settings being built (lets a killed build resume from its finished shards);
  * manifest.json: written last and atomically; a cache without it is unfinished.
The settings (`spec`) name everything that changes the tokens: the data settings that change the pixels,
the tokenizer's fingerprint (a hash of its config and params), L, N and the views. A cache built under
other settings is rebuilt (one warning says which differ), never reused.
"""

import itertools
import json
import logging
import os
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from var_jax import checkpoint, sharding
from var_jax.data import preprocessing, sources
from var_jax.data.config import validate_config
from var_jax.data.iterators import derive_seed, host_batch_size, process_layout
from var_jax.errors import ConfigError, MissingFileError
from var_jax.fileio import atomic_write, atomic_write_json
from var_jax.models.vqvae import VQVAE

CACHE_VERSION = 1
SHARD_IMAGES = 8192  # images per shard file (ImageNet 256 px, 1 view: 11 MB); a killed build loses at most one
MAX_VOCAB = 1 << 16  # token ids are stored as uint16
VIEW_SALT = 1 << 40  # separates the views' seeds from the image iterator's (seed, epoch) seeds
# Data fields that do not change the stored pixels (order, caching, the eval split, the cache switch itself).
_NOT_PIXELS = (
    'data_dir',
    'shuffle_buffer',
    'in_memory_max_mb',
    'eval_split',
    'eval_folder',
    'pretokenize',
    'synthetic_test_size',
)


def entries_per_image(cfg) -> int:
    """Stored token maps per image: the views, twice when each is also stored flipped."""
    return cfg.pretokenize_crops * (2 if cfg.random_flip else 1)


def host_dir(cache_root: str, process_index: int, process_count: int) -> str:
    return os.path.join(cache_root, f'host{process_index:04d}of{process_count:04d}')


def view_preprocess(cfg, seed: int, decode):
    """(position, (key, label)) -> {'views': float32 (entries, R, R, 3) in [-1, 1], 'label'}: the stored views
    of one image, in entry order (see the module docstring)."""
    size, crops = cfg.image_size, cfg.pretokenize_crops
    mid = round(cfg.resize_ratio * size)
    base = derive_seed(seed, VIEW_SALT)

    def fn(position, key_and_label):
        key, label = key_and_label
        image = preprocessing.resize_short_side(decode(key), mid)
        center = preprocessing.center_crop(image, size)
        center.set_shape([size, size, 3])
        views = [center]
        if crops > 1:
            seeds = tf.random.experimental.stateless_split(tf.stack([tf.constant(base, tf.int64), position]), crops)
            views += [tf.image.stateless_random_crop(image, [size, size, 3], seed=seeds[v]) for v in range(1, crops)]
        if cfg.random_flip:
            views = [x for view in views for x in (view, tf.image.flip_left_right(view))]
        return {'views': preprocessing.to_model_range(tf.stack(views)), 'label': label}

    return fn


def cache_spec(
    cfg, *, fingerprint: str, seq_len: int, seed: int, num_examples: int, process_index: int, process_count: int
) -> dict:
    """Everything the stored tokens depend on; a cache is reused only when its spec equals this one."""
    data = {k: v for k, v in dict(cfg.items()).items() if k not in _NOT_PIXELS}
    if cfg.source != 'synthetic':
        data = {k: v for k, v in data.items() if not k.startswith('synthetic_')}
    if cfg.source == 'folder':
        data['folder'] = os.path.realpath(os.path.expanduser(cfg.folder))
    spec = dict(
        version=CACHE_VERSION,
        tokenizer=fingerprint,
        data=data,
        seq_len=int(seq_len),
        entries=entries_per_image(cfg),
        crop_seed=int(seed) if cfg.pretokenize_crops > 1 else None,
        num_examples=int(num_examples),
        process_index=int(process_index),
        process_count=int(process_count),
        shard_images=SHARD_IMAGES,
    )
    return json.loads(json.dumps(spec))  # as it reads back from the manifest


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if 'data' in keys:
        keys.remove('data')
        keys += sorted(
            f'data.{k}' for k in set(old['data']) | set(new['data']) if old['data'].get(k) != new['data'].get(k)
        )
    return ', '.join(sorted(keys))


def _clear(directory: str):
    for name in os.listdir(directory):
        if name.endswith(('.npy', '.json')):
            os.remove(os.path.join(directory, name))


def _shard_names(k: int):
    return f'tokens_{k:05d}.npy', f'labels_{k:05d}.npy'


def build_token_cache(
    data_config,
    cache_root: str,
    encode: Callable[[np.ndarray], np.ndarray],
    *,
    fingerprint: str,
    seq_len: int,
    vocab_size: int,
    seed: int,
    batch_images: int = 64,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> str:
    """Encodes this host's training images into `cache_root` unless a matching cache is there; returns its dir.

    encode: float32 (n, R, R, 3) views in [-1, 1] -> (n, seq_len) token ids (the frozen tokenizer's
    `img_to_idx`, concatenated over scales); fingerprint identifies the tokenizer (its config and params).
    A finished cache of the same spec is reused; one of another spec is rebuilt with a warning saying why;
    an unfinished one of the same spec resumes after its last finished shard.
    """
    cfg = validate_config(data_config)
    if vocab_size > MAX_VOCAB:
        raise ConfigError(
            f'data.pretokenize stores token ids as uint16, but vae.vocab_size={vocab_size} > '
            f'{MAX_VOCAB}; set data.pretokenize=False for this tokenizer'
        )
    process_index, process_count = process_layout(process_index, process_count)
    shard = sources.shard(cfg, True, process_index, process_count)
    spec = cache_spec(
        cfg,
        fingerprint=fingerprint,
        seq_len=seq_len,
        seed=seed,
        num_examples=shard.num_examples,
        process_index=process_index,
        process_count=process_count,
    )
    out = host_dir(cache_root, process_index, process_count)
    os.makedirs(out, exist_ok=True)
    manifest_path, building_path = os.path.join(out, 'manifest.json'), os.path.join(out, 'building.json')
    manifest = _read_json(manifest_path)
    if manifest is not None and manifest.get('spec') == spec:
        missing = [f for s in manifest['shards'] for f in s.values() if not os.path.exists(os.path.join(out, f))]
        if not missing:
            return out
        logging.warning('token cache %s lacks %s; rebuilding it', out, ', '.join(missing[:3]))
        _clear(out)
    elif manifest is not None:
        logging.warning(
            'token cache %s was built under other settings (%s differ); rebuilding it',
            out,
            _differences(manifest.get('spec') or {}, spec),
        )
        _clear(out)
    elif os.path.exists(building_path) and _read_json(building_path) != spec:
        logging.warning(
            'unfinished token cache %s was started under other settings (%s differ); rebuilding it',
            out,
            _differences(_read_json(building_path) or {}, spec),
        )
        _clear(out)
    for name in os.listdir(out):  # temporary files of writes a killed build left behind
        if '.tmp' in name:
            os.remove(os.path.join(out, name))
    atomic_write_json(building_path, spec)

    n, E = shard.num_examples, spec['entries']
    num_shards = -(-n // SHARD_IMAGES)
    first = 0  # shards are written in order, each atomically: the finished ones are a prefix
    while first < num_shards and all(os.path.exists(os.path.join(out, f)) for f in _shard_names(first)):
        first += 1
    done = min(first * SHARD_IMAGES, n)
    views = f'{cfg.pretokenize_crops} view{"s" if cfg.pretokenize_crops > 1 else ""}'
    views += ' and their mirrors' if cfg.random_flip else ''
    print(
        f'[pretokenize] encoding {n} training images x {views} with the frozen tokenizer into {out}'
        + (f' (resuming after {done} images)' if done else '')
        + ' ...',
        flush=True,
    )
    ds = (
        shard.ordered(None)
        .enumerate()  # the position in the shard seeds the random crops
        .skip(done)  # before decoding: skipping costs no JPEG decode
        .map(view_preprocess(cfg, seed, shard.decode), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_images)
        .prefetch(2)
    )
    t0 = time.time()
    t_first = last_print = None
    tokens, labels, k = [], [], first
    for batch in ds.as_numpy_iterator():
        b = len(batch['label'])
        views = batch['views'].reshape((b * E,) + batch['views'].shape[2:])
        ids = np.asarray(encode(views))
        if ids.shape != (b * E, seq_len):
            raise ValueError(f'the encoder returned token ids of shape {ids.shape}, expected {(b * E, seq_len)}')
        tokens.append(ids.astype(np.uint16).reshape(b, E, seq_len))
        labels.append(batch['label'].astype(np.int32))
        if t_first is None:  # img/s and the ETA exclude compiling the encoder
            t_first, done_first = time.time(), done + b
        done += b
        while sum(len(x) for x in labels) >= min(SHARD_IMAGES, n - k * SHARD_IMAGES) > 0:
            tokens, labels = _write_shard(out, k, np.concatenate(tokens), np.concatenate(labels))
            k += 1
        now = time.time()
        if done == n or (done > done_first and (last_print is None or now - last_print >= 30)):
            timed = done > done_first  # else the whole run was one batch: its time includes compiling
            rate = (done - done_first) / max(now - t_first, 1e-9) if timed else b / max(now - t0, 1e-9)
            eta = (n - done) / rate
            print(f'[pretokenize] {done}/{n} images | {rate:.1f} img/s | ETA {eta / 60:.1f} min', flush=True)
            last_print = now
    if done != n:
        raise RuntimeError(
            f'the training split yielded {done} images, expected {n}; the cache in {out} is '
            f'left unfinished (run again to resume)'
        )
    names = [_shard_names(i) for i in range(num_shards)]
    atomic_write_json(manifest_path, dict(spec=spec, shards=[dict(tokens=t, labels=l) for t, l in names]))
    os.remove(building_path)
    size = n * E * seq_len * 2
    print(
        f'[pretokenize] cached {n} images x {E} token maps x {seq_len} tokens ({size / 2**20:.1f} MiB) in '
        f'{time.time() - t0:.1f} s',
        flush=True,
    )
    return out


def _write_shard(out: str, k: int, tokens: np.ndarray, labels: np.ndarray):
    """Writes shard k (its first SHARD_IMAGES images, atomically) and returns the rest as the new buffers."""
    t_name, l_name = _shard_names(k)
    for name, array in ((l_name, labels[:SHARD_IMAGES]), (t_name, tokens[:SHARD_IMAGES])):  # tokens last
        with atomic_write(os.path.join(out, name)) as tmp:
            np.save(tmp, array)
    return [tokens[SHARD_IMAGES:]], [labels[SHARD_IMAGES:]]


def make_token_iterator(
    cache_root: str,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Iterator[dict]:
    """Infinite iterator of this host's pre-tokenised training batches, starting at global step `start_step`.

    The contract of `make_train_iterator`: yields {'tokens': int32 (b, L), 'label': int32 (b,)} with
    b = global_batch_size // process_count, and the batch at step s depends only on (cache, seed, s,
    process layout). Epochs are `N // b` full batches in an order seeded by (seed, epoch), the order the
    image iterator gives an in-memory split; each image's entry (view, flip) is drawn per (seed, epoch).
    The shards are memory-mapped, not loaded.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be a non-negative int, got {seed!r}.')
    if start_step < 0:
        raise ValueError(f'start_step must be >= 0, got {start_step}.')
    process_index, process_count = process_layout(process_index, process_count)
    batch = host_batch_size(global_batch_size, process_count)
    out = host_dir(cache_root, process_index, process_count)
    manifest = _read_json(os.path.join(out, 'manifest.json'))
    if manifest is None:
        raise MissingFileError(
            f'no finished token cache in {out}; the transformer stage builds it when '
            f'data.pretokenize=True (var_jax.data.tokens.build_token_cache)'
        )
    spec = manifest['spec']
    tokens = [np.load(os.path.join(out, s['tokens']), mmap_mode='r') for s in manifest['shards']]
    labels = np.concatenate([np.load(os.path.join(out, s['labels'])) for s in manifest['shards']])
    n, E, size = spec['num_examples'], spec['entries'], spec['shard_images']
    if len(labels) != n:
        raise ConfigError(f'token cache {out} holds {len(labels)} images, its manifest says {n}; delete it to rebuild')
    steps_per_epoch = n // batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f'this host has {n} training examples, fewer than one per-host batch of {batch}; '
            f'use a smaller batch or more data.'
        )
    first_epoch, skip = divmod(int(start_step), steps_per_epoch)

    def gather(positions, entries):
        out_tokens = np.empty((len(positions), spec['seq_len']), np.int32)
        shard_of = positions // size
        for k in np.unique(shard_of):
            sel = np.nonzero(shard_of == k)[0]
            order = sel[np.argsort(positions[sel])]  # ascending reads from the memory map
            out_tokens[order] = tokens[k][positions[order] - k * size, entries[order]]
        return out_tokens

    def batches():
        b0 = skip
        for epoch in itertools.count(first_epoch):
            perm = np.random.default_rng(derive_seed(seed, epoch)).permutation(n)
            entry = np.random.default_rng(derive_seed(seed, epoch, VIEW_SALT)).integers(0, E, n)
            for b in range(b0, steps_per_epoch):
                positions = perm[b * batch : (b + 1) * batch]
                yield {'tokens': gather(positions, entry[positions]), 'label': labels[positions]}
            b0 = 0

    return batches()


# --- the frozen tokenizer that fills the cache -------------------------------------------------------
def tokenizer_fingerprint(vqvae: VQVAE, vae_params) -> str:
    """sha256 of the tokenizer's config and params: a token cache is valid for exactly this tokenizer.
    decode_precision and decode_dtype are left out: the decoder makes no token ids."""
    cfg = {k: v for k, v in checkpoint.model_config(vqvae).items() if k not in ('decode_precision', 'decode_dtype')}
    return checkpoint.fingerprint(vae_params, cfg)


def make_encoder(vqvae: VQVAE, vae_params, per_device: int = 64):
    """float32 (n, R, R, 3) images -> int32 (n, L) token ids (`VQVAE.img_to_idx`, scales concatenated), on this
    host's devices only (each host encodes its own shard), in zero-padded chunks of per_device x devices
    images: one compile. 64 images per device keep a 256-px encoder's memory modest."""
    mesh = sharding.make_mesh(1, devices=jax.local_devices())
    rep, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    fn = jax.jit(
        lambda p, x: jnp.concatenate(vqvae.apply({'params': p}, x, method=VQVAE.img_to_idx), axis=1),
        in_shardings=(rep, split),
        out_shardings=split,
    )
    n = per_device * mesh.size
    on_devices = []  # the params on this host's devices, put there by the first call (none when a cache is reused)

    def encode(images):
        if not on_devices:
            on_devices.append(jax.device_put(jax.device_get(vae_params), rep))
        params = on_devices[0]
        out = []
        for i in range(0, len(images), n):
            m = min(n, len(images) - i)
            chunk = np.zeros((n,) + images.shape[1:], np.float32)
            chunk[:m] = images[i : i + m]
            out.append(np.asarray(fn(params, chunk))[:m])
        return np.concatenate(out)

    return encode
