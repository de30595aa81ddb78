"""The numbers tokenizers are compared by: reconstruction PSNR, per-scale codebook usage and perplexity, and the
reconstruction FID (rFID: the FID of the reconstructions against the eval split's statistics).

Used by the tokenizer stage's evaluation (every eval_every steps and at the end) and by
`--mode=eval --config.eval.what=tokenizer`. Everything accumulates over batches on the host.
"""

import functools
import itertools
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import sharding
from var_jax.models.vqvae import VQVAE


def psnr(images: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """(N,) PSNR in dB of images against their reconstructions, both (N, H, W, 3) in [0, 1]."""
    mse = np.mean((np.asarray(images, np.float64) - np.asarray(recon, np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def usage_and_perplexity(counts: np.ndarray) -> tuple:
    """(share of the codebook used, perplexity exp(entropy) of the code frequencies) of one scale's code counts:
    perplexity = vocabulary size for uniform use, 1 for a single code."""
    counts = np.asarray(counts, np.float64)
    p = counts / max(counts.sum(), 1)
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    return float((counts > 0).mean()), float(np.exp(entropy))


class ReconStats:
    """Accumulates PSNR, the per-channel absolute error and each scale's code counts over batches."""

    def __init__(self, patch_nums, vocab_size: int):
        self.patch_nums, self.vocab_size = tuple(patch_nums), vocab_size
        self.counts = np.zeros((len(self.patch_nums), vocab_size), np.int64)
        self.psnr, self.channel_err, self.n = 0.0, np.zeros(3), 0
        self.recons = []

    def add(self, images, recon, idx, keep_recons: bool = False):
        """images, recon: (B, H, W, 3) in [0, 1]; idx: the B images' token ids per scale [(B, pn * pn)]."""
        images, recon = np.asarray(images), np.asarray(recon)
        self.psnr += float(psnr(images, recon).sum())
        self.channel_err += np.abs(images - recon).mean(axis=(1, 2)).sum(0)
        self.n += len(images)
        for si, ids in enumerate(idx):
            self.counts[si] += np.bincount(np.asarray(ids).ravel(), minlength=self.vocab_size)
        if keep_recons:
            self.recons.append(recon)

    def summary(self) -> dict:
        out = {'psnr': self.psnr / max(self.n, 1)}
        out.update({f'abs_err_{c}': float(v) / max(self.n, 1) for c, v in zip('rgb', self.channel_err)})
        for pn, counts in zip(self.patch_nums, self.counts):
            out[f'usage_{pn}'], out[f'perplexity_{pn}'] = usage_and_perplexity(counts)
        out['usage'], out['perplexity'] = usage_and_perplexity(self.counts.sum(0))
        return out


@functools.lru_cache(maxsize=8)
def _recon_step(vqvae: VQVAE, mesh):
    """The jitted (params, images) -> (reconstructions, token ids), one per model and mesh: an evaluation every
    eval_every steps reuses its executable instead of tracing and compiling again."""

    def recon_and_ids(params, images):
        idx = vqvae.apply({'params': params}, images, method=VQVAE.img_to_idx)
        return jnp.clip(vqvae.apply({'params': params}, idx, method=VQVAE.idx_to_img), -1, 1), idx

    rep = sharding.replicated(mesh)
    return jax.jit(recon_and_ids, in_shardings=(rep, sharding.batch_sharding(mesh)), out_shardings=rep)


def evaluate(vqvae: VQVAE, vae_params, batches: Iterable[dict], mesh, num_batches: Optional[int] = None, fid=None):
    """Reconstruction metrics of the tokenizer over eval batches ({'image' in [-1, 1], 'label', 'mask'}: this host's
    part, as `data.make_eval_iterator` yields them; every host calls this). fid: (reference statistics, extractor)
    of `reference_stats.training_fid_setup`, or None for no rFID. Returns {name: value}, the same on every host."""
    from var_jax import metrics

    step = _recon_step(vqvae, mesh)
    stats = ReconStats(vqvae.patch_nums, vqvae.vocab_size)
    for batch in itertools.islice(batches, num_batches):
        batch = sharding.global_batch(batch, mesh)
        mask = sharding.to_host(batch['mask']).astype(bool)  # every host's, in the outputs' order
        images = sharding.to_host(batch['image'])[mask] * 0.5 + 0.5
        recon, idx = jax.device_get(step(vae_params, batch['image']))
        stats.add(images, recon[mask] * 0.5 + 0.5, [ids[mask] for ids in idx], keep_recons=fid is not None)
    results = stats.summary()
    if fid is not None and stats.recons:
        results['rfid'] = metrics.fid_of_images(np.concatenate(stats.recons), *fid)
    return results
