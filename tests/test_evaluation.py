"""The evaluation command and its reference statistics, on the tiny golden VAR and a random FID Inception.

* `main.py --mode=eval` end to end in subprocesses on 2 simulated CPU devices: run A uninterrupted; run B paused
  after its 2nd of 4 sample shards, SIGKILLed, then the same command again, which resumes from the shards on
  disk. A and B must agree exactly (metrics, samples), B's first shards must be untouched. These runs are a job
  on the session's background lane (tests/conftest.py): they start with the session.
* Reference statistics from an ADM batch (its own mu/sigma used), an image folder and the synthetic TFDS split
  equal the statistics of the same images' features; the cache is reused, and refused when its settings differ.
* Bad input: missing Inception weights, wrong-kind / wrong-resolution references, stale caches, shards of
  another evaluation, num_images not divisible by the batch: one clear error each, before any sampling.

    python tests/test_evaluation.py paused N MAIN_PY_FLAGS...   (the worker: main.py, paused after shard N)
"""

import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R, N_IMAGES, BATCH = 32, 16, 4  # the golden model samples 32 px; 4 shards of 4


def _paused_main(n, argv):
    """main.py, except that the eval loop sleeps after writing sample shard n (the test SIGKILLs it there)."""
    sys.path.insert(0, REPO)
    import contextlib

    from absl import app

    import main
    from var_jax import evaluation

    real = evaluation.atomic_write

    @contextlib.contextmanager
    def hooked(path):
        with real(path) as tmp:
            yield tmp
        if os.path.basename(path) == f'shard_{n - 1:06d}.npz':
            print(f'PAUSED after shard {n}', flush=True)
            time.sleep(3600)

    evaluation.atomic_write = hooked
    sys.argv = ['main.py'] + argv
    app.run(main.main, flags_parser=main.parse_flags)


if __name__ == '__main__' and sys.argv[1] == 'paused':
    _paused_main(int(sys.argv[2]), sys.argv[3:])
    sys.exit(0)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from var_jax import evaluation, metrics, reference_stats, sampling  # noqa: E402
from var_jax.models import inception  # noqa: E402

from conftest import DATA, ENVIRON, GOLDEN_PATCH_NUMS, golden_state_dict  # noqa: E402


def _random_inception(seed=0):
    """Random FID-Inception params made on the host (no init to compile): He-scaled convs, so that the features
    are not all ~0, and random BN means."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        if 'kernel' in name:
            fan_in = np.prod(x.shape[:-1])
            return (rng.standard_normal(x.shape) * np.sqrt((2.0 if x.ndim == 4 else 1.0) / fan_in)).astype(np.float32)
        if 'running_mean' in name:
            return rng.normal(0, 0.1, x.shape).astype(np.float32)
        return (np.ones if 'scale' in name or 'running_var' in name else np.zeros)(x.shape, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, inception.abstract_params())


def _make_files(golden, base):
    """In base: the golden tiny models as a converted checkpoint, random Inception weights (.npz) and an ADM
    reference batch of 10 random 32-px images carrying its own (made-up) statistics."""
    from var_jax import checkpoint, convert

    ckpt = str(base / 'tiny_ckpt')
    vae_cfg, vae_params = convert.convert_vae(golden_state_dict(golden, 'vae/'), GOLDEN_PATCH_NUMS)
    var_cfg, var_params = convert.convert_var(golden_state_dict(golden, 'var/'), GOLDEN_PATCH_NUMS)
    checkpoint.save_pretrained(ckpt, {'vae': vae_cfg, 'var': var_cfg}, {'vae': vae_params, 'var': var_params})
    params = _random_inception()
    weights = str(base / 'inception_random.npz')
    np.savez(weights, **inception.flatten_params(params))
    rng = np.random.default_rng(0)
    adm = str(base / 'VIRTUAL_tiny32.npz')
    stats = {'mu': rng.normal(size=2048), 'sigma': np.eye(2048), 'mu_s': rng.normal(size=2023), 'sigma_s': np.eye(2023)}
    np.savez(adm, arr_0=rng.integers(0, 256, (10, R, R, 3), dtype=np.uint8), **stats)
    return {'base': base, 'ckpt': ckpt, 'weights': weights, 'params': params, 'adm': adm, 'adm_stats': stats}


@pytest.fixture(scope='module')
def files(golden, tmp_path_factory):
    return _make_files(golden, tmp_path_factory.mktemp('eval'))


@pytest.fixture(scope='module')
def extractor(files):
    """One compiled InceptionFeatures (batch 4) shared by the in-process tests."""
    return metrics.InceptionFeatures(files['params'])


def _config(files, **overrides):
    from configs import var_small

    c = var_small.get_config()
    values = {
        'init_from': files['ckpt'],
        'eval.num_images': N_IMAGES,
        'eval.batch_size': BATCH,
        'eval.inception_path': files['weights'],
        'eval.reference': files['adm'],
        'sample.top_k': 20,
        'data.data_dir': str(files['base'] / 'tfds'),
        'data.synthetic_train_size': 16,
        'data.synthetic_test_size': 6,
    } | overrides
    for key, value in values.items():
        *parents, leaf = key.split('.')
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _direct_stats(extractor, images):
    """Features of uint8 images fed to the extractor directly, in batches of 4 (zero-padded)."""
    out = {k: [] for k in extractor.KEYS}
    for lo in range(0, len(images), BATCH):
        chunk = images[lo : lo + BATCH]
        padded = np.concatenate([chunk, np.zeros((BATCH - len(chunk),) + chunk.shape[1:], np.uint8)])
        for k, v in extractor(padded).items():
            out[k].append(v[: len(chunk)])
    return {k: np.concatenate(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- reference statistics
def test_adm_reference_uses_its_own_statistics_and_our_pool_features(files, extractor):
    config = _config(files, **{'eval.reference_cache': str(files['base'] / 'adm_cache.npz')})
    ref = reference_stats.reference_statistics(config, extractor, R, log=lambda *a: None)
    assert ref['stats_from'] == 'file'
    for k, v in files['adm_stats'].items():
        np.testing.assert_array_equal(ref[k], v)
    with np.load(files['adm']) as f:
        images = f['arr_0']
    direct = _direct_stats(extractor, images)  # 10 images: the streamed reader's last batch is padded
    np.testing.assert_allclose(ref['pool'], direct['pool'], rtol=1e-6, atol=1e-7)
    config.eval.reference_file_stats = False
    ref = reference_stats.reference_statistics(config, _Refuse(extractor), R)  # from the cache, no Inception run
    stats = metrics.FeatureStats(2048)
    stats.update(direct['pool'])
    np.testing.assert_allclose(ref['mu'], stats.mean_cov()[0], rtol=1e-6, atol=1e-9)
    assert ref['stats_from'] == 'var_jax'


class _Refuse:
    """An extractor that must not be called (the statistics must come from the cache)."""

    def __init__(self, extractor):
        self.fingerprint, self.mesh = extractor.fingerprint, extractor.mesh

    def __call__(self, images):
        raise AssertionError('the cached reference statistics were recomputed')


def _write_folder(root, images):
    from PIL import Image

    for i, img in enumerate(images):
        d = root / f'class_{i % 2}'
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f'{i}.png')


@pytest.mark.parametrize('source', ['folder', 'synthetic'])
def test_dataset_reference_is_the_statistics_of_its_images(files, extractor, tmp_path, source):
    """A folder of 32-px PNGs and the synthetic TFDS eval split: the cached mu/sigma/pool are those of the
    images themselves (the 32 -> 32 preprocessing is the identity), and settings are recorded."""
    from var_jax import data

    if source == 'folder':
        images = np.random.default_rng(1).integers(0, 256, (6, R, R, 3), dtype=np.uint8)
        _write_folder(tmp_path / 'refs', images)
        config = _config(files, **{'eval.reference': str(tmp_path / 'refs')})
        cache = str(tmp_path / 'refs') + f'.var_jax_ref_{R}px.npz'
    else:
        config = _config(files, **{'eval.reference': ''})
        batches = list(data.make_eval_iterator(config.data.to_dict() | {'resize_ratio': 1.0}, BATCH))
        images = np.concatenate([np.rint((b['image'][b['mask']] + 1) * 127.5) for b in batches]).astype(np.uint8)
        cache = os.path.join(config.data.data_dir, 'var_jax_fid_refs', f'var_synthetic_shapes_test_{R}px.npz')
    ref = reference_stats.reference_statistics(config, extractor, R, log=lambda *a: None)
    direct = _direct_stats(extractor, images)
    np.testing.assert_allclose(np.sort(ref['pool'], 0), np.sort(direct['pool'], 0), rtol=1e-5, atol=1e-6)
    stats = metrics.FeatureStats(reference_stats.SPATIAL_DIM)
    stats.update(direct['spatial'])
    np.testing.assert_allclose(ref['mu_s'], stats.mean_cov()[0], rtol=1e-5, atol=1e-7)
    assert os.path.exists(cache) and ref['settings']['kind'] == source
    with np.load(cache) as f:
        assert json.loads(str(f['settings']))['data.resize_ratio'] == 1.0
    # Reused as it is; a different crop is a different reference.
    reference_stats.reference_statistics(config, _Refuse(extractor), R)
    config.eval.reference_resize_ratio = 1.125
    with pytest.raises(
        reference_stats.ReferenceStatsError,
        match=r'(?s)other settings.*data.resize_ratio.*1\.0, 1\.125'
        r'.*Delete',
    ):
        reference_stats.reference_statistics(config, _Refuse(extractor), R)


def test_fid_of_images_against_statistics_of_the_same_features(files, extractor):
    images = np.random.default_rng(2).integers(0, 256, (6, R, R, 3), dtype=np.uint8)
    direct = _direct_stats(extractor, images)
    stats = metrics.FeatureStats(2048)
    stats.update(direct['pool'])
    mu, sigma = stats.mean_cov()
    # The reference: the statistics of the same images' features with the mean moved by 0.01 per dimension, so
    # FID = 2048 * 0.01^2 exactly (up to the eigenvalue noise of the 2042-d null space): fid_of_images computes
    # the same features and statistics (the covariance term vanishes) and counts the mean term.
    moved = metrics.fid_of_images(images, {'mu': mu + 0.01, 'sigma': sigma}, extractor, batch_size=BATCH)
    assert moved == pytest.approx(2048 * 1e-4, abs=1e-5 * np.trace(sigma))
    assert reference_stats.training_fid_setup(_config(files, **{'eval.inception_path': ''}), R) is None


def test_fid_during_training(files):
    """The transformer stage's on_eval scores eval.train_num_images samples (config.sample's settings) with
    metrics.fid_of_images against the reference; with no Inception weights and no validation it is switched off."""
    from var_jax import api, sharding
    from var_jax.trainers import transformer

    vqvae, vae_params, var, var_params = api.load_pretrained(files['ckpt'])
    # The ADM file's own mu / sigma are the reference; the cache (written by the first test of this module, or
    # by the first setup below) spares recomputing the reference images' features, which FID does not use.
    config = _config(
        files,
        **{
            'eval.train_num_images': 6,
            'eval.val_batches': 0,
            'sample.batch_size': 4,
            'eval.reference_cache': str(files['base'] / 'adm_cache.npz'),
        },
    )
    mesh = sharding.make_mesh(1)
    got = transformer._validation(config, vqvae, var, vae_params, mesh)(var_params, 0)
    assert set(got) == {'fid'} and np.isfinite(got['fid'])
    images = transformer._samples(config, mesh, (vqvae, vae_params, var, var_params), 6, '', config.sample.seed + 1)
    assert images.shape == (6, R, R, 3) and not np.array_equal(images[0], images[4])  # two batches, other keys
    ref, extractor = reference_stats.training_fid_setup(config, R, mesh)
    assert got['fid'] == pytest.approx(metrics.fid_of_images(images, ref, extractor), rel=1e-9)
    off = _config(files, **{'eval.inception_path': '', 'eval.val_batches': 0})
    assert transformer._validation(off, vqvae, var, vae_params, mesh) is None


# ----------------------------------------------------------------------------- bad input
def test_bad_input_fails_before_sampling(files, tmp_path, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError('sampled despite bad input')

    monkeypatch.setattr(sampling, 'sample', no_sampling)
    url = 'pytorch-fid/releases/download/fid_weights'
    with pytest.raises(inception.InceptionWeightsError, match=f'(?s)inception_path is empty.*{url}'):
        evaluation.run(_config(files, **{'eval.inception_path': ''}), str(tmp_path))
    with pytest.raises(FileNotFoundError, match=url):
        evaluation.run(_config(files, **{'eval.inception_path': str(tmp_path / 'x.npz')}), str(tmp_path))
    with pytest.raises(ValueError, match=r'num_images=10 is not divisible by eval.batch_size=4.*batch_size=2'):
        evaluation.run(_config(files, **{'eval.num_images': 10}), str(tmp_path))
    np.savez(tmp_path / 'tokens.npz', idx_00=np.zeros((4, 1), np.int32))
    np.savez(tmp_path / 'float.npz', arr_0=np.zeros((4, R, R, 3), np.float32))
    np.savez(tmp_path / 'big.npz', arr_0=np.zeros((4, 64, 64, 3), np.uint8))
    np.savez(
        tmp_path / 'bad_mu.npz',
        arr_0=np.zeros((4, R, R, 3), np.uint8),
        mu=np.zeros(64),
        sigma=np.eye(64),
        mu_s=np.zeros(64),
        sigma_s=np.eye(64),
    )
    (tmp_path / 'notes.txt').write_text('x')
    for name, pattern in (
        ('tokens.npz', r'not an ADM reference batch: it has no arr_0.*idx_00'),
        ('float.npz', r'arr_0 holds float32 \(4, 32, 32, 3\), not uint8'),
        ('big.npz', r'holds 64 px images but the model samples 32 px.*VIRTUAL_imagenet32_labeled'),
        ('bad_mu.npz', r'mu has shape \(64,\), not \(2048,\)'),
        ('notes.txt', r'neither an ADM reference batch \(\.npz\) nor a directory'),
    ):
        with pytest.raises(reference_stats.ReferenceStatsError, match=pattern):
            evaluation.run(_config(files, **{'eval.reference': str(tmp_path / name)}), str(tmp_path))
    # A cache written with other Inception weights is refused, not reused.
    cache = tmp_path / 'stale.npz'
    np.savez(cache, settings=np.array(json.dumps({'kind': 'adm_npz', 'inception': 'other'})), pool=np.zeros((4, 2048)))
    with pytest.raises(
        reference_stats.ReferenceStatsError, match=r"(?s)other settings.*'inception': \('other'.*Delete"
    ):
        evaluation.run(_config(files, **{'eval.reference_cache': str(cache)}), str(tmp_path))
    # Shards of another evaluation (other cfg) in the workdir.
    os.makedirs(tmp_path / 'eval' / 'samples')
    (tmp_path / 'eval' / 'samples' / 'settings.json').write_text(json.dumps({'cfg': 1.5, 'top_k': 20}))
    with pytest.raises(evaluation.EvalSettingsError, match=r"(?s)another evaluation.*'cfg': \(1.5, 3.0\)"):
        evaluation._check_settings(str(tmp_path / 'eval' / 'samples'), {'cfg': 3.0, 'top_k': 20})


# ----------------------------------------------------------------------------- end to end, killed and resumed
def _env(cache_dir):
    return dict(
        ENVIRON,
        JAX_PLATFORMS='cpu',
        TF_CPP_MIN_LOG_LEVEL='3',
        XLA_FLAGS=(ENVIRON.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2').strip(),
        PYTHONPATH=REPO + os.pathsep + ENVIRON.get('PYTHONPATH', ''),
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    )


def _flags(files, workdir):
    c = {
        'init_from': files['ckpt'],
        'eval.num_images': N_IMAGES,
        'eval.batch_size': BATCH,
        'eval.inception_path': files['weights'],
        'eval.reference': files['adm'],
        'sample.top_k': 20,
        'sample.cfg': 3.0,
        'eval.reference_cache': str(files['base'] / 'e2e_ref_cache.npz'),
    }
    return ['--config=configs/var_small.py', f'--workdir={workdir}', '--mode=eval'] + [
        f'--config.{k}={v}' for k, v in c.items()
    ]


def _run(args, log, env, procs, timeout=900):
    with open(log, 'w') as f:
        p = subprocess.Popen([sys.executable] + args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    procs.append(p)
    try:
        p.wait(timeout)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, open(log).read()[-5000:]
    return p


def start_background(jobs, items, tmp_path_factory, config):
    """conftest's background_jobs calls this before the session's first test: the end-to-end runs (with files of
    their own) go on its background lane, so they run while the tests before them run."""
    if not any(item.name == 'test_eval_end_to_end_killed_and_resumed' for item in items):
        return
    try:
        cache_dir = str(config.cache.mkdir('var_jax_test_eval_jax_cache'))
    except AttributeError:  # -p no:cacheprovider
        cache_dir = str(tmp_path_factory.mktemp('eval_jax_cache'))
    procs = []
    jobs.on_close(lambda: [p.kill() for p in procs if p.poll() is None])
    jobs.submit(_end_to_end, tmp_path_factory.mktemp('eval_e2e'), cache_dir, procs, name='eval_end_to_end')


@pytest.mark.slow
def test_eval_end_to_end_killed_and_resumed(background_jobs):
    """main.py --mode=eval, run A uninterrupted; run B SIGKILLed after its 2nd of 4 sample shards, then run again:
    A and B agree exactly (metrics, samples) and B's first shards are untouched (see _end_to_end)."""
    background_jobs.result('eval_end_to_end')


def _end_to_end(tmp_path, cache_dir, procs):
    """The runs of test_eval_end_to_end_killed_and_resumed and its checks (a background job)."""
    files = _make_files(dict(np.load(os.path.join(DATA, 'tiny_public.npz'))), tmp_path)
    env = _env(cache_dir)
    work_a, work_b = str(tmp_path / 'A'), str(tmp_path / 'B')
    _run(['main.py'] + _flags(files, work_a), str(tmp_path / 'A.log'), env, procs)

    log_b1 = str(tmp_path / 'B1.log')
    with open(log_b1, 'w') as f:
        b1 = subprocess.Popen(
            [sys.executable, __file__, 'paused', '2'] + _flags(files, work_b),
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    procs.append(b1)
    try:
        deadline = time.time() + 900
        while 'PAUSED after shard 2' not in open(log_b1).read():
            assert b1.poll() is None, f'run B exited before the kill:\n{open(log_b1).read()[-5000:]}'
            assert time.time() < deadline, 'run B never paused'
            time.sleep(0.2)
    finally:
        b1.kill()  # SIGKILL, our own process
        b1.wait()
    assert b1.returncode == -signal.SIGKILL
    shard_dir = os.path.join(work_b, 'eval', 'samples')
    assert sorted(f for f in os.listdir(shard_dir) if f.startswith('shard_')) == [
        'shard_000000.npz',
        'shard_000001.npz',
    ]
    assert not os.path.exists(os.path.join(work_b, 'eval', 'results.json'))
    before = {f: os.stat(os.path.join(shard_dir, f)).st_mtime_ns for f in os.listdir(shard_dir)}
    _run(['main.py'] + _flags(files, work_b), str(tmp_path / 'B2.log'), env, procs)
    assert 'already sampled' in open(str(tmp_path / 'B2.log')).read()
    for f, t in before.items():  # resumed, not resampled
        assert os.stat(os.path.join(shard_dir, f)).st_mtime_ns == t

    results = {}
    for w in (work_a, work_b):
        with open(os.path.join(w, 'eval', 'results.json')) as f:
            results[w] = json.load(f)
    a, b = results[work_a], results[work_b]
    for k in ('fid', 'sfid', 'inception_score', 'inception_score_std', 'precision', 'recall'):
        assert isinstance(a[k], float) and np.isfinite(a[k]) and a[k] == b[k], k
    assert a['num_images'] == N_IMAGES and a['image_size'] == R and a['devices'] == 2
    assert a['checkpoint'] == os.path.abspath(files['ckpt'])
    assert a['sampling'] == {
        'cfg': 3.0,
        'top_k': 20,
        'top_p': 0.9,
        'temperature': 1.0,
        'more_smooth': False,
        'seed': 0,
        'labels': '',
    }
    assert a['reference']['stats_from'] == 'file' and a['reference']['num_images'] == 10
    assert a['inception']['path'] == os.path.abspath(files['weights'])
    npz = {}
    for w in (work_a, work_b):
        with np.load(os.path.join(w, 'eval', f'samples_{N_IMAGES}x{R}x{R}x3.npz')) as f:
            npz[w] = (f['arr_0'], f['arr_1'])
    images, labels = npz[work_a]
    assert images.dtype == np.uint8 and images.shape == (N_IMAGES, R, R, 3) and images.std() > 0
    np.testing.assert_array_equal(labels, np.arange(N_IMAGES) % 10)
    np.testing.assert_array_equal(images, npz[work_b][0])
    with np.load(os.path.join(shard_dir, 'shard_000001.npz')) as f:
        np.testing.assert_array_equal(f['images'], images[BATCH : 2 * BATCH])
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(work_a, 'eval', 'tb')))
