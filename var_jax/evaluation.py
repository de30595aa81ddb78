"""The evaluation command (`python main.py --mode=eval`): FID, sFID, IS, precision and recall of a VAR.

    python main.py --config=configs/var_d16.py --mode=eval --config.init_from=checkpoints/var_d16 \
        --config.eval.inception_path=checkpoints/inception_fid.npz \
        --config.eval.reference=VIRTUAL_imagenet256_labeled.npz

It samples config.eval.num_images images with the config's sampling settings (config.sample.*) in
shards of config.eval.batch_size, split over all devices, keeps each shard's uint8 images and Inception
features under workdir/eval/samples (an interrupted evaluation resumes from the shards on disk), then
scores them against the reference statistics (`reference_stats.py`) and writes eval/results.json,
TensorBoard scalars (eval/tb) and the samples as an ADM sample batch (eval/samples_NxRxRx3.npz,
uint8 NHWC in arr_0, labels in arr_1) for a cross-check with the ADM suite.
"""

import json
import os
import time
import zipfile
from typing import Optional

import jax
import numpy as np

from var_jax import checkpoint, generate, metrics, reference_stats, sample_batches, sharding
from var_jax.errors import ConfigError, MissingFileError, UserError
from var_jax.fileio import atomic_write
from var_jax.models import inception

SAMPLE_KEYS = ('cfg', 'top_k', 'top_p', 'temperature', 'more_smooth', 'seed', 'labels')


class EvalSettingsError(UserError):
    """Shards on disk that another evaluation (other settings) wrote."""


def check_settings(config) -> int:
    """Shard size (a multiple of the device count); refuses settings that cannot evaluate (preflight calls it)."""
    e, n_dev = config.eval, jax.device_count()
    if e.num_images < max(e.is_splits, e.pr_k + 1, 2):
        raise ConfigError(
            f'eval.num_images={e.num_images} is too small: the Inception Score takes '
            f'eval.is_splits={e.is_splits} splits and precision/recall k={e.pr_k} neighbours'
        )
    if e.batch_size < 1 or e.num_images % e.batch_size:
        fits = max(d for d in range(1, max(e.batch_size, 1) + 1) if e.num_images % d == 0)
        raise ConfigError(
            f'eval.num_images={e.num_images} is not divisible by eval.batch_size={e.batch_size}: '
            f'every shard must be a full batch; choose e.g. --config.eval.batch_size={fits}'
        )
    if e.batch_size % n_dev:
        raise ConfigError(f'eval.batch_size={e.batch_size} must be a multiple of the {n_dev} devices')
    return e.batch_size


def _load_inception(path: str):
    """FID-Inception params from the converted .npz, or (needs torch) straight from pytorch-fid's .pth."""
    if path.endswith('.pth'):
        from var_jax import convert

        if not os.path.isfile(path):
            raise MissingFileError(f'Inception weights {path} not found. {inception.WHERE_TO_GET}')
        return convert.convert_inception(convert.load_torch_state_dict(path))
    return inception.load_params(path)


def _shard_path(shard_dir: str, i: int) -> str:
    return os.path.join(shard_dir, f'shard_{i:06d}.npz')


def _load_shard(path: str, batch: int, size: int) -> Optional[dict]:
    """A finished shard, or None when it is missing or unreadable (a kill cannot tear it: writes are atomic)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as f:
            shard = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    ok = shard.get('images', np.zeros(0)).shape == (batch, size, size, 3) and all(
        k in shard and len(shard[k]) == batch for k in ('labels',) + metrics.InceptionFeatures.KEYS
    )
    return shard if ok else None


def _check_settings(shard_dir: str, settings: dict) -> None:
    path = os.path.join(shard_dir, 'settings.json')
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            raise EvalSettingsError(
                f'{shard_dir} holds samples of another evaluation; differing settings (on disk, now): {diff}. '
                f'Delete {shard_dir} to start over, or evaluate in another --workdir'
            )
    elif jax.process_index() == 0:
        os.makedirs(shard_dir, exist_ok=True)
        checkpoint.atomic_write_json(path, settings)


def _sample_shards(config, workdir, models, extractor, settings, batch: int) -> tuple:
    """Samples every missing shard; returns (shard paths, images per second of this run)."""
    from tqdm import tqdm

    e, s = config.eval, config.sample
    vqvae, vae_params, var, var_params = models
    shard_dir = os.path.join(workdir, 'eval', 'samples')
    _check_settings(shard_dir, settings)
    labels = sample_batches.parse_labels(s.labels, e.num_images, var.num_classes)  # '': N / C per class
    mesh, n = extractor.mesh, e.num_images // batch
    vae_params, var_params = jax.device_put((vae_params, var_params), sharding.replicated(mesh))
    models = (vqvae, vae_params, var, var_params)
    to_uint8 = jax.jit(lambda x: (jax.numpy.clip(x, 0, 1) * 255).astype(jax.numpy.uint8))  # as metrics.to_uint8
    paths = [_shard_path(shard_dir, i) for i in range(n)]
    todo = [i for i in range(n) if _load_shard(paths[i], batch, vqvae.image_size) is None]
    if len(todo) < n and jax.process_index() == 0:
        print(f'eval: {n - len(todo)} of {n} shards already sampled in {shard_dir}; sampling the rest', flush=True)
    t0 = time.time()
    bar = tqdm(total=n, initial=n - len(todo), desc='eval sampling', unit='shard', disable=jax.process_index() != 0)
    batches = sample_batches.sample_batches(
        models,
        labels,
        jax.random.PRNGKey(s.seed),
        sample_batches.settings(s),
        batch_size=batch,
        mesh=mesh,
        batches=todo,
    )
    for done, (i, _, out) in enumerate(batches, 1):
        images = to_uint8(out['images'])
        feats = extractor(images)
        images = sharding.to_host(images)  # a collective: every host, before process 0 writes
        if jax.process_index() == 0:
            with atomic_write(paths[i]) as tmp:
                np.savez(tmp, images=images, labels=labels[i * batch : (i + 1) * batch], **feats)
        bar.update(1)
        bar.set_postfix_str(f'{done * batch / (time.time() - t0):.1f} img/s')
    bar.close()
    return paths, (len(todo) * batch / (time.time() - t0) if todo else None)


def _write_adm_npz(path: str, shard_paths, batch: int, size: int) -> None:
    """The ADM sample batch: arr_0 uint8 (N, R, R, 3), arr_1 int labels, streamed shard by shard."""
    shape = (len(shard_paths) * batch, size, size, 3)
    labels = []
    with atomic_write(path) as tmp, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open('arr_0.npy', 'w', force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {'descr': '|u1', 'fortran_order': False, 'shape': shape})
            for p in shard_paths:
                with np.load(p) as shard:
                    f.write(np.ascontiguousarray(shard['images']).tobytes())
                    labels.append(shard['labels'])
        with z.open('arr_1.npy', 'w') as f:
            np.lib.format.write_array(f, np.concatenate(labels).astype(np.int64))


def score(shard_paths, ref: dict, config, mesh=None) -> dict:
    """Every metric of the sampled shards against a reference (see reference_stats.reference_statistics)."""
    e = config.eval
    pool, spatial = metrics.FeatureStats(2048), metrics.FeatureStats(reference_stats.SPATIAL_DIM)
    pool_feats, logits = [], []
    for p in shard_paths:
        with np.load(p) as shard:
            pool.update(shard['pool'])
            spatial.update(shard['spatial'])
            pool_feats.append(shard['pool'])
            logits.append(shard['logits_unbiased'])
    return metrics.summarize(
        pool, spatial, np.concatenate(pool_feats), np.concatenate(logits), ref, e.is_splits, e.pr_k, mesh
    )


def run_tokenizer(config, workdir: str) -> dict:
    """`--mode=eval --config.eval.what=tokenizer`: the tokenizer's reconstructions of eval.num_images eval-split
    images (PSNR, per-channel error, codebook usage / perplexity per scale, and rFID when eval.inception_path is
    set) into workdir/eval_tokenizer/{results.json, tb/}. The tokenizer: the run's (tokenizer/export, else
    export), else config.init_from's."""
    from var_jax import data, recon_metrics

    e = config.eval
    candidates = [os.path.join(workdir, 'tokenizer', 'export'), checkpoint.export_dir(workdir)]
    source = next(
        (p for p in candidates + [config.init_from] if p and os.path.exists(os.path.join(p, 'model.json'))), None
    )
    if source is None:
        raise MissingFileError(
            f'no tokenizer to evaluate: none of {candidates} holds one and init_from is not set; '
            f'train one (--config.stages=tokenizer) or set --config.init_from'
        )
    from var_jax import api

    vqvae, vae_params, _, _ = api.load_pretrained(source)
    mesh = sharding.make_mesh(1)
    fid = None
    if e.inception_path:
        extractor = metrics.InceptionFeatures(_load_inception(e.inception_path), mesh)
        fid = reference_stats.reference_statistics(config, extractor, vqvae.image_size), extractor
    batches = data.make_eval_iterator(config.data, e.batch_size)
    results = recon_metrics.evaluate(vqvae, vae_params, batches, mesh, -(-e.num_images // e.batch_size), fid)
    results.update(checkpoint=os.path.abspath(source), num_images=e.num_images, image_size=vqvae.image_size)
    out_dir = os.path.join(workdir, 'eval_tokenizer')
    if jax.process_index() == 0:
        checkpoint.atomic_write_json(os.path.join(out_dir, 'results.json'), results)
        from flax.metrics import tensorboard

        writer = tensorboard.SummaryWriter(os.path.join(out_dir, 'tb'))
        for k, v in results.items():
            if isinstance(v, float):
                writer.scalar(f'eval_tokenizer/{k}', v, e.num_images)
        writer.close()
        rfid = f'  rFID {results["rfid"]:.3f}' if 'rfid' in results else ''
        print(
            f'tokenizer eval of {source}: PSNR {results["psnr"]:.2f} dB  codebook usage {results["usage"]:.3f}  '
            f'perplexity {results["perplexity"]:.1f}{rfid} -> {os.path.join(out_dir, "results.json")}'
        )
    return results


def run(config, workdir: str) -> dict:
    """`--mode=eval`: samples, scores and writes workdir/eval/{results.json, tb/, samples_*.npz}; returns the results.

    TensorBoard scalars eval/{fid, sfid, inception_score, precision, recall} are logged at step num_images.
    With eval.what='tokenizer' it scores the tokenizer's reconstructions instead (`run_tokenizer`).
    """
    if config.eval.what == 'tokenizer':
        return run_tokenizer(config, workdir)
    e, s = config.eval, config.sample
    batch = check_settings(config)
    params = _load_inception(e.inception_path)  # before anything slow: a missing file fails at once
    mesh = sharding.make_mesh(1)
    extractor = metrics.InceptionFeatures(params, mesh)
    models = generate.load_models(config, workdir)
    size = models[0].image_size
    ref = reference_stats.reference_statistics(config, extractor, size)
    source = checkpoint.find_trained_var(workdir, config.init_from)
    settings = {
        'checkpoint': source,
        'num_images': e.num_images,
        'batch_size': batch,
        'image_size': size,
        'inception': extractor.fingerprint,
        **{k: s[k] for k in SAMPLE_KEYS},
    }
    t0 = time.time()
    shard_paths, img_per_s = _sample_shards(config, workdir, models, extractor, settings, batch)
    t1 = time.time()
    results = score(shard_paths, ref, config, mesh)
    out_dir = os.path.join(workdir, 'eval')
    npz = os.path.join(out_dir, f'samples_{e.num_images}x{size}x{size}x3.npz')
    results.update(
        num_images=e.num_images,
        image_size=size,
        checkpoint=source,
        sampling={k: s[k] for k in SAMPLE_KEYS},
        batch_size=batch,
        reference=dict(ref['settings'], stats_from=ref['stats_from'], num_images=int(len(ref['pool']))),
        inception={'path': os.path.abspath(e.inception_path), 'fingerprint': extractor.fingerprint},
        samples_npz=npz,
        devices=jax.device_count(),
        backend=jax.default_backend(),
        sampling_images_per_s=img_per_s,
        sampling_s=round(t1 - t0, 1),
        scoring_s=round(time.time() - t1, 1),
    )
    if jax.process_index() == 0:
        if e.write_npz:
            _write_adm_npz(npz, shard_paths, batch, size)
        checkpoint.atomic_write_json(os.path.join(out_dir, 'results.json'), results)
        from flax.metrics import tensorboard

        writer = tensorboard.SummaryWriter(os.path.join(out_dir, 'tb'))
        for k in ('fid', 'sfid', 'inception_score', 'precision', 'recall'):
            writer.scalar(f'eval/{k}', results[k], e.num_images)
        writer.close()
        print(
            f'eval of {source} ({e.num_images} images, cfg {s.cfg}, top-k {s.top_k}, top-p {s.top_p}): '
            f'FID {results["fid"]:.3f}  sFID {results["sfid"]:.3f}  IS {results["inception_score"]:.2f}  '
            f'precision {results["precision"]:.3f}  recall {results["recall"]:.3f}  -> '
            f'{os.path.join(out_dir, "results.json")}'
        )
    return results
