"""The tokenizer's quality numbers (var_jax/recon_metrics.py): PSNR, codebook usage / perplexity, and their
evaluation over eval batches, in the trainer and in --mode=eval --config.eval.what=tokenizer."""

import json
import os

import numpy as np
import pytest

from var_jax import recon_metrics, sharding


def test_psnr_of_a_known_error():
    images = np.zeros((2, 4, 4, 3))
    recon = np.stack([np.full((4, 4, 3), 0.1), np.full((4, 4, 3), 0.01)])
    np.testing.assert_allclose(recon_metrics.psnr(images, recon), [20.0, 40.0], rtol=1e-9)


def test_usage_and_perplexity_of_known_code_counts():
    assert recon_metrics.usage_and_perplexity(np.full(64, 5)) == pytest.approx((1.0, 64.0))
    assert recon_metrics.usage_and_perplexity(np.eye(64)[3] * 9) == pytest.approx((1 / 64, 1.0))
    usage, ppl = recon_metrics.usage_and_perplexity(np.array([1, 1, 2, 0]))  # p = 1/4, 1/4, 1/2
    assert usage == 0.75 and ppl == pytest.approx(np.exp(-(2 * 0.25 * np.log(0.25) + 0.5 * np.log(0.5))))


def _batches(images, batch):
    """Eval batches as make_eval_iterator yields them: the last one zero-padded, 'mask' marking real rows."""
    for lo in range(0, len(images), batch):
        chunk = images[lo : lo + batch]
        n = len(chunk)
        pad = np.zeros((batch - n,) + chunk.shape[1:], np.float32)
        yield {'image': np.concatenate([chunk, pad]), 'label': np.zeros(batch, np.int32), 'mask': np.arange(batch) < n}


def test_evaluate_counts_every_real_image_once(golden, tiny):
    """Over padded batches: the PSNR and the code counts are those of the real images alone, computed directly."""
    from var_jax.models.vqvae import VQVAE

    vqvae, vae_params, _, _ = tiny
    images = np.concatenate(
        [golden['vae_io/img_B3HW'].transpose(0, 2, 3, 1)] * 2 + [-golden['vae_io/img_B3HW'][:1].transpose(0, 2, 3, 1)]
    )
    res = recon_metrics.evaluate(vqvae, vae_params, _batches(images.astype(np.float32), 2), sharding.make_mesh(1))
    idx = vqvae.apply({'params': vae_params}, images, method=VQVAE.img_to_idx)
    recon = np.clip(np.asarray(vqvae.apply({'params': vae_params}, idx, method=VQVAE.idx_to_img)), -1, 1)
    np.testing.assert_allclose(res['psnr'], recon_metrics.psnr(images * 0.5 + 0.5, recon * 0.5 + 0.5).mean(), rtol=1e-5)
    last = np.bincount(np.asarray(idx[-1]).ravel(), minlength=vqvae.vocab_size)
    assert res[f'usage_{vqvae.patch_nums[-1]}'] == pytest.approx((last > 0).mean())
    assert set(res) >= {'abs_err_r', 'abs_err_g', 'abs_err_b', 'usage', 'perplexity'} and 'rfid' not in res


def test_eval_mode_scores_a_tokenizer(golden, tiny, tmp_path):
    """--mode=eval --config.eval.what=tokenizer on a run's tokenizer export: results.json with the numbers."""
    from configs import var_small
    from var_jax import checkpoint, evaluation, preflight

    vqvae, vae_params, _, _ = tiny
    work = tmp_path / 'work'
    checkpoint.save_pretrained(
        str(work / 'tokenizer' / 'export'), {'vae': checkpoint.model_config(vqvae)}, {'vae': vae_params}
    )
    config = var_small.get_config()
    config.data.update(
        dict(
            data_dir=str(tmp_path / 'data'), image_size=vqvae.image_size, synthetic_train_size=8, synthetic_test_size=6
        )
    )
    config.vae.update(dict(patch_nums=tuple(vqvae.patch_nums), ch_mult=tuple(vqvae.ch_mult)))
    config.eval.update(dict(what='tokenizer', num_images=6, batch_size=4))
    preflight.check(config, 'eval', str(work))  # no Inception needed: no rFID
    results = evaluation.run(config, str(work))
    saved = json.load(open(work / 'eval_tokenizer' / 'results.json'))
    assert saved['psnr'] == pytest.approx(results['psnr']) and 0 < saved['psnr'] < 60
    assert saved['num_images'] == 6 and os.path.isdir(work / 'eval_tokenizer' / 'tb')
    config.eval.what = 'reconstructions'
    with pytest.raises(preflight.ConfigError, match="eval.what='reconstructions'"):
        preflight.check(config, 'eval', str(work))
