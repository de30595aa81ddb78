"""Reference statistics for FID, sFID and precision/recall: from an ADM reference batch, a TFDS split or a folder.

config.eval.reference picks the source:
- a path to an `.npz` ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz of guided-diffusion):
  uint8 NHWC images in arr_0, and, when present, the suite's own mu / sigma / mu_s / sigma_s, which FID
  and sFID then use (config.eval.reference_file_stats) so that our FID compares with the ADM suite's;
- a directory of images, one subfolder per class (read with var_jax.data's folder source);
- '' (default): the eval split of the config's own dataset (config.data: TFDS, folder or synthetic).
Dataset images are resized (short side round(eval.reference_resize_ratio * R)) and center-cropped to the
model's resolution R with the official preprocessing. The statistics and pool features are computed once
and cached as .npz beside the data (or at config.eval.reference_cache) with the settings that produced
them; a cache whose settings differ from the current ones is an error, never silently reused.
"""

import json
import logging
import os
import zipfile

import jax
import numpy as np

from var_jax import metrics, sharding
from var_jax.errors import MissingFileError, UserError
from var_jax.fileio import atomic_write
from var_jax.models import inception

SPATIAL_DIM = inception.SPATIAL_DIM
CACHE_VERSION = 1
_STATS = {'mu': (2048,), 'sigma': (2048, 2048), 'mu_s': (SPATIAL_DIM,), 'sigma_s': (SPATIAL_DIM, SPATIAL_DIM)}
# data fields that do not change the evaluation images
_TRAIN_ONLY = (
    'random_flip',
    'shuffle_buffer',
    'in_memory_max_mb',
    'train_split',
    'synthetic_train_size',
    'pretokenize',
    'pretokenize_crops',
)


class ReferenceStatsError(UserError):
    """A reference that cannot serve: wrong kind or resolution, or a cache of other settings."""


def _npz_header(path: str, name: str):
    """(shape, dtype) of array `name` of an .npz without reading it; None when absent; names for errors."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n[:-4] for n in z.namelist() if n.endswith('.npy')]
            if name not in names:
                return None, names
            with z.open(f'{name}.npy') as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                return (shape, dtype), names
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise ReferenceStatsError(f'{path} is not a readable .npz ({type(e).__name__}: {e})') from None


def _npz_batches(path: str, name: str, batch: int):
    """Rows of a C-ordered array in an .npz, `batch` at a time, without loading it whole (10 000 x 256^2 x 3)."""
    with zipfile.ZipFile(path) as z, z.open(f'{name}.npy') as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:  # not ADM's layout; read it whole
            arr = np.load(path)[name]
            yield from (arr[lo : lo + batch] for lo in range(0, len(arr), batch))
            return
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for lo in range(0, shape[0], batch):
            n = min(batch, shape[0] - lo)
            yield np.frombuffer(f.read(n * row), dtype).reshape((n,) + tuple(shape[1:]))


def _check_adm(path: str, image_size: int, min_images: int) -> bool:
    """Validates an ADM reference batch; returns whether it carries its own statistics."""
    if not os.path.isfile(path):
        raise MissingFileError(
            f'eval.reference={path} not found (an ADM reference batch such as '
            f"VIRTUAL_imagenet256_labeled.npz from guided-diffusion's evaluations/README)"
        )
    header, names = _npz_header(path, 'arr_0')
    if header is None:
        raise ReferenceStatsError(
            f'{path} is not an ADM reference batch: it has no arr_0 (the images); it holds {names}'
        )
    (shape, dtype) = header
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2]:
        raise ReferenceStatsError(
            f'{path}: arr_0 holds {dtype} {shape}, not uint8 (N, R, R, 3) RGB images as an ADM reference batch does'
        )
    if shape[1] != image_size:
        raise ReferenceStatsError(
            f'{path} holds {shape[1]} px images but the model samples {image_size} px; use the '
            f'reference batch of that resolution (e.g. VIRTUAL_imagenet{image_size}_labeled.npz)'
        )
    if shape[0] < min_images:
        raise ReferenceStatsError(f'{path} holds {shape[0]} images; precision/recall need at least {min_images}')
    has = {k for k in _STATS if _npz_header(path, k)[0] is not None}
    if has and has != set(_STATS):
        raise ReferenceStatsError(f'{path} has {sorted(has)} but not all of {sorted(_STATS)}')
    for k in (k for k in _STATS if k in has):
        if tuple(_npz_header(path, k)[0][0]) != _STATS[k]:
            raise ReferenceStatsError(
                f'{path}: {k} has shape {_npz_header(path, k)[0][0]}, not {_STATS[k]}: not the '
                f"statistics of the FID Inception's pool_3 / mixed_6/conv features"
            )
    return bool(has)


def describe(config, image_size: int, fingerprint: str):
    """(settings that fix the reference statistics, cache path, data config or None for an ADM batch)."""
    e, ref = config.eval, config.eval.reference
    settings = {'version': CACHE_VERSION, 'image_size': image_size, 'inception': fingerprint}
    if ref.endswith('.npz'):
        path = os.path.abspath(ref)
        return settings | {'kind': 'adm_npz', 'path': path}, e.reference_cache or path[:-4] + '.var_jax_ref.npz', None
    data_cfg = config.data.to_dict() | {'image_size': image_size, 'resize_ratio': e.reference_resize_ratio}
    if ref:
        if not os.path.isdir(ref):
            raise ReferenceStatsError(
                f'eval.reference={ref!r} is neither an ADM reference batch (.npz) nor a directory '
                f"of images (one subfolder per class); leave it empty for config.data's eval split"
            )
        data_cfg |= {'source': 'folder', 'folder': os.path.abspath(ref), 'eval_folder': os.path.abspath(ref)}
    settings |= {'kind': data_cfg['source']} | {f'data.{k}': v for k, v in data_cfg.items() if k not in _TRAIN_ONLY}
    if data_cfg['source'] == 'folder':
        root = (data_cfg['eval_folder'] or data_cfg['folder']).rstrip('/')
        cache = f'{root}.var_jax_ref_{image_size}px.npz'
    else:
        root = data_cfg['data_dir'] or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
        cache = os.path.join(
            os.path.expanduser(root),
            'var_jax_fid_refs',
            f'{data_cfg["name"]}_{data_cfg["eval_split"]}_{image_size}px.npz'.replace('/', '_'),
        )
    return settings, e.reference_cache or cache, data_cfg


def _image_batches(data_cfg, adm_path, batch: int, mesh):
    """(global uint8 image batch as a jax.Array, global mask) of the reference images."""
    bs = sharding.batch_sharding(mesh)
    if adm_path:
        for images in _npz_batches(adm_path, 'arr_0', batch):
            mask = np.arange(batch) < len(images)
            padded = np.concatenate([images, np.zeros((batch - len(images),) + images.shape[1:], np.uint8)])
            yield jax.make_array_from_callback(padded.shape, bs, lambda idx: padded[idx]), mask
        return
    from var_jax import data

    for b in data.make_eval_iterator(
        data_cfg, batch, process_index=jax.process_index(), process_count=jax.process_count()
    ):
        # The pipeline gives round(pixel) * 2 / 255 - 1: back to the exact uint8 pixels.
        local = np.clip(np.rint((b['image'] + 1.0) * 127.5), 0, 255).astype(np.uint8)
        images, mask = sharding.global_batch((local, b['mask']), mesh)
        yield images, sharding.to_host(mask)


def _compute(data_cfg, adm_path, extractor, batch: int, log) -> dict:
    pool, spatial, feats = metrics.FeatureStats(2048), metrics.FeatureStats(SPATIAL_DIM), []
    for i, (images, mask) in enumerate(_image_batches(data_cfg, adm_path, batch, extractor.mesh)):
        out = extractor(images)
        pool.update(out['pool'][mask])
        spatial.update(out['spatial'][mask])
        feats.append(out['pool'][mask])
        if i % 20 == 0:
            log(f'reference statistics: {pool.n} images')
    (mu, sigma), (mu_s, sigma_s) = pool.mean_cov(), spatial.mean_cov()
    return {'mu': mu, 'sigma': sigma, 'mu_s': mu_s, 'sigma_s': sigma_s, 'pool': np.concatenate(feats)}


def reference_statistics(config, extractor: 'metrics.InceptionFeatures', image_size: int, log=print) -> dict:
    """{'mu', 'sigma', 'mu_s', 'sigma_s' (float64), 'pool' (N, 2048) features, 'settings', 'stats_from'},
    from the cache when its settings match, else computed (and cached) with `extractor`."""
    e = config.eval
    settings, cache, data_cfg = describe(config, image_size, extractor.fingerprint)
    adm_path = settings.get('path')
    has_stats = _check_adm(adm_path, image_size, e.pr_k + 1) if adm_path else False
    if os.path.exists(cache):
        with np.load(cache) as f:
            saved = json.loads(str(f['settings'])) if 'settings' in f.files else {}
            ref = {k: f[k] for k in f.files if k != 'settings'}
        diff = {
            k: (saved.get(k), settings.get(k))
            for k in sorted(set(saved) | set(settings))
            if saved.get(k) != settings.get(k)
        }
        if diff:
            raise ReferenceStatsError(
                f'the cached reference statistics {cache} were made with other settings (cached, '
                f'now): {diff}. Delete {cache} to recompute them, or set '
                f'--config.eval.reference_cache to another path'
            )
    else:
        log(f'computing reference statistics ({settings["kind"]}) -> {cache}')
        ref = _compute(data_cfg, adm_path, extractor, e.batch_size, log)
        if len(ref['pool']) <= e.pr_k:
            raise ReferenceStatsError(
                f'the reference has {len(ref["pool"])} images; precision/recall need more than eval.pr_k={e.pr_k}'
            )
        if jax.process_index() == 0:
            with atomic_write(cache) as tmp:
                np.savez(tmp, settings=np.array(json.dumps(settings, sort_keys=True)), **ref)
    ref['settings'], ref['stats_from'] = settings, 'var_jax'
    if has_stats and e.reference_file_stats:
        with np.load(adm_path) as f:
            ref.update({k: f[k].astype(np.float64) for k in _STATS})
        ref['stats_from'] = 'file'
    return ref


def training_fid_setup(config, image_size: int, mesh=None):
    """(reference, extractor) for `metrics.fid_of_images` during training, or None (with one log line) without
    Inception weights."""
    if not config.eval.inception_path:
        logging.warning(
            'FID during training is off: no Inception weights (set --config.eval.inception_path to the '
            '.npz of python -m var_jax.convert --inception %s)',
            inception.PTH_FILE,
        )
        return None
    extractor = metrics.InceptionFeatures(inception.load_params(config.eval.inception_path), mesh)
    return reference_statistics(config, extractor, image_size), extractor
