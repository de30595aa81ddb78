"""The sampling command (`python main.py --mode=sample`): images, a per-scale picture, tokens.

Models come from the run's export (workdir/export, written at the end of training) or, if the
run has none, from config.init_from (a converted official checkpoint). Settings are
config.sample.* (`--config.sample.cfg=4 --config.sample.labels=1,2,3`).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import api, checkpoint, sample_batches, sharding
from var_jax.errors import MissingFileError
from var_jax.fileio import atomic_write
from var_jax.images import save_png
from var_jax.models.vqvae import VQVAE


def load_models(config, workdir: str):
    """(vqvae, vae_params, var, var_params) of the run in workdir, else of config.init_from."""
    path = checkpoint.find_trained_var(workdir, config.init_from)
    if path is None:
        candidates = [checkpoint.export_dir(workdir)] + ([config.init_from] if config.init_from else [])
        raise MissingFileError(
            f'nothing to sample from: none of {candidates} holds a trained VAR (model.json with a "var" '
            f'entry). Train first (python main.py --config=... --workdir={workdir}) or set '
            f'--config.init_from to a directory written by python -m var_jax.convert --vae ... --var ...'
        )
    return api.load_pretrained(path)


@functools.partial(jax.jit, static_argnums=0)
def _progression(vqvae: VQVAE, vae_params, idx):
    m = vqvae.bind({'params': vae_params})
    return jnp.stack([m.fhat_to_img(f) for f in m.quantize.idx_to_fhat(idx, cumulative=True)]) * 0.5 + 0.5


def progression(vqvae: VQVAE, vae_params, idx):
    """Images decoded from f_hat after each scale: (num_scales, B, R, R, 3) in [0, 1]."""
    return _progression(vqvae, vae_params, [jnp.asarray(i) for i in idx])


def run(config, workdir: str):
    """Samples config.sample.num_images images in batches; writes PNGs and tokens under workdir/samples."""
    from tqdm import tqdm

    s = config.sample
    vqvae, vae_params, var, var_params = load_models(config, workdir)
    labels = sample_batches.parse_labels(s.labels, s.num_images, var.num_classes)
    mesh = sharding.make_mesh(1)
    batch = sample_batches.batch_size_for(s.batch_size, s.num_images, mesh)
    vae_params, var_params = jax.device_put((vae_params, var_params), sharding.replicated(mesh))
    models = (vqvae, vae_params, var, var_params)
    images, idx_all = [], []
    batches = sample_batches.sample_batches(
        models, labels, jax.random.PRNGKey(s.seed), sample_batches.settings(s), batch_size=batch, mesh=mesh
    )
    for _, n, out in tqdm(
        batches, total=math.ceil(len(labels) / batch), desc='sampling', unit='batch', disable=jax.process_index() != 0
    ):
        images.append(sharding.to_host(out['images'])[:n])
        idx_all.append([sharding.to_host(x)[:n] for x in out['idx']])
    images = np.concatenate(images)
    idx = [np.concatenate([b[si] for b in idx_all]) for si in range(len(var.patch_nums))]
    if jax.process_index() == 0:
        _write(config, workdir, vqvae, vae_params, var, labels, images, idx)
    return images, idx


def _write(config, workdir, vqvae, vae_params, var, labels, images, idx):
    """samples/grid.png, samples/progression.png (the first 8 images after every scale) and samples/tokens.npz."""
    out_dir = os.path.join(workdir, 'samples')
    os.makedirs(out_dir, exist_ok=True)
    grid = save_png(os.path.join(out_dir, 'grid.png'), images, ncols=config.sample.ncols)
    n_prog = min(8, len(labels))
    prog = np.asarray(progression(vqvae, vae_params, [jnp.asarray(x[:n_prog]) for x in idx]))
    # One row per image, one column per scale (coarse to fine).
    steps = save_png(
        os.path.join(out_dir, 'progression.png'),
        prog.transpose(1, 0, 2, 3, 4).reshape(-1, *prog.shape[2:]),
        ncols=len(var.patch_nums),
    )
    with atomic_write(os.path.join(out_dir, 'tokens.npz')) as tmp:
        np.savez(tmp, labels=labels, **{f'idx_{si:02d}': x for si, x in enumerate(idx)})
    print(f'wrote {grid}, {steps} and {os.path.join(out_dir, "tokens.npz")} ({len(labels)} images)')
