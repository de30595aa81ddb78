"""The port against the official PyTorch outputs (tests/data/tiny_public.npz)."""

import jax
import numpy as np
import optax
import pytest

from var_jax import convert

from conftest import golden_state_dict, nchw

ATOL = 1e-4


@pytest.fixture(scope='module')
def outputs(golden, tiny):
    """Every intermediate of tokenizer + transformer on the golden images, from one jitted call."""
    vqvae, vp, var, tp = tiny

    @jax.jit
    def run(vp, tp, img, labels):
        bound = vqvae.bind({'params': vp})
        f = bound.img_to_f(img)
        idx, fhats = bound.quantize.f_to_idx(f, return_fhat=True)
        x = bound.idx_to_var_input(idx)
        return dict(
            f=f,
            idx=idx,
            fhats=fhats,
            dec_raw=bound.fhat_to_img(fhats[-1], clamp=False),
            rec=bound.idx_to_img(idx),
            x=x,
            logits=var.apply({'params': tp}, labels, x),
        )

    img = golden['vae_io/img_B3HW'].transpose(0, 2, 3, 1)
    return jax.device_get(run(vp, tp, img, golden['var_io/label_B']))


def test_encoder_features(golden, outputs):
    np.testing.assert_allclose(nchw(outputs['f']), golden['vae_io/f_BChw'], atol=ATOL, rtol=0)


def test_indices_of_every_scale(golden, outputs):
    for si, idx in enumerate(outputs['idx']):
        np.testing.assert_array_equal(idx, golden[f'vae_io/idx_Bl/{si:02d}'], err_msg=f'scale {si}')
    np.testing.assert_array_equal(np.concatenate(outputs['idx'], 1), golden['vae_io/idx_BL'])


def test_fhat_after_every_scale(golden, outputs):
    for si, fhat in enumerate(outputs['fhats']):
        np.testing.assert_allclose(nchw(fhat), golden['vae_io/fhat_per_scale_SBChw'][si], atol=ATOL, rtol=0)
    np.testing.assert_allclose(nchw(outputs['fhats'][-1]), golden['vae_io/fhat_BChw'], atol=ATOL, rtol=0)


def test_decoded_image(golden, outputs):
    np.testing.assert_allclose(nchw(outputs['dec_raw']), golden['vae_io/dec_raw_B3HW'], atol=ATOL, rtol=0)
    np.testing.assert_allclose(nchw(outputs['rec']), golden['vae_io/rec_img_B3HW'], atol=ATOL, rtol=0)


def test_teacher_forcing_input(golden, outputs):
    np.testing.assert_allclose(outputs['x'], golden['var_io/x_BLCv_wo_first_l'], atol=ATOL, rtol=0)


def test_var_logits(golden, outputs):
    np.testing.assert_allclose(outputs['logits'], golden['var_io/logits_BLV'], atol=ATOL, rtol=0)


def test_loss_and_gradient_of_every_parameter(golden, tiny):
    """One teacher-forced step: the official loss and d loss / d param for all VAR params."""
    _, _, var, tp = tiny
    x, labels = golden['var_io/x_BLCv_wo_first_l'], golden['var_io/label_B']
    targets = golden['vae_io/idx_BL']

    def loss_fn(params):
        logits = var.apply({'params': params}, labels, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(tp)
    np.testing.assert_allclose(loss, golden['train/loss'], rtol=1e-4)
    # The official gradients go through the same key mapping and layout changes as weights.
    ref = convert.state_dict_to_params(
        golden_state_dict(golden, 'train/grad/'), jax.eval_shape(lambda: tp), convert._VAR_BUFFERS
    )
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = flat_ref[path]
        assert np.abs(np.asarray(g) - r).max() <= 1e-4 * np.abs(r).max() + 1e-8, jax.tree_util.keystr(path)


def test_api_round_trip_matches_golden(golden, tiny):
    """The public encode/decode/teacher_forcing_logits give the official results."""
    from var_jax import api

    vqvae, vp, var, tp = tiny
    img = golden['vae_io/img_B3HW'].transpose(0, 2, 3, 1)
    idx = api.encode(vqvae, vp, img)
    np.testing.assert_array_equal(np.concatenate(idx, 1), golden['vae_io/idx_BL'])
    np.testing.assert_allclose(nchw(api.decode(vqvae, vp, idx)), golden['vae_io/rec_img_B3HW'], atol=ATOL)
    logits = api.teacher_forcing_logits(vqvae, vp, var, tp, idx, golden['var_io/label_B'])
    np.testing.assert_allclose(logits, golden['var_io/logits_BLV'], atol=ATOL)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_lean_cross_entropy_matches_the_one_hot_form_and_the_official_gradients(golden, tiny, smoothing):
    """losses.cross_entropy (no one-hot, no log-softmax copy): optax's one-hot CE per token, in value and
    gradient, also for bf16 logits; without smoothing the official loss and parameter gradients."""
    from var_jax import losses

    _, _, var, tp = tiny
    x, labels, targets = golden['var_io/x_BLCv_wo_first_l'], golden['var_io/label_B'], golden['vae_io/idx_BL']
    V = var.vocab_size

    def one_hot_ce(z):
        onehot = jax.nn.one_hot(targets, V) * (1 - smoothing) + smoothing / V
        return optax.softmax_cross_entropy(z.astype(np.float32), onehot)

    z = golden['var_io/logits_BLV']
    for logits in (z, z.astype(jax.numpy.bfloat16)):
        ce, correct = losses.cross_entropy(logits, targets, smoothing)
        np.testing.assert_allclose(ce, one_hot_ce(logits), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(correct, np.argmax(np.asarray(logits, np.float32), -1) == targets)
        g, g_ref = (
            jax.grad(lambda l, f=f: (f(l) * np.arange(l.shape[1])).sum())(logits.astype(np.float32))
            for f in (lambda l: losses.cross_entropy(l, targets, smoothing)[0], one_hot_ce)
        )
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
    if smoothing:
        return
    loss, grads = jax.jit(
        jax.value_and_grad(lambda p: losses.cross_entropy(var.apply({'params': p}, labels, x), targets)[0].mean())
    )(tp)
    np.testing.assert_allclose(loss, golden['train/loss'], rtol=1e-4)
    ref = dict(
        jax.tree_util.tree_leaves_with_path(
            convert.state_dict_to_params(
                golden_state_dict(golden, 'train/grad/'), jax.eval_shape(lambda: tp), convert._VAR_BUFFERS
            )
        )
    )
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(np.asarray(g) - ref[path]).max() <= 1e-4 * np.abs(ref[path]).max() + 1e-8, jax.tree_util.keystr(
            path
        )
