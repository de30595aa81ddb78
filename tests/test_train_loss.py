"""The transformer's loss against the official code: loss and gradients, label smoothing, masked scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.trainers import transformer

from conftest import golden_state_dict


# =============================================================================================
# Golden: loss and gradients of the official code through transformer.var_loss
# =============================================================================================
@pytest.fixture(scope='module')
def golden_grad(golden, tiny):
    """jitted (params, x, token_weights) -> ((loss, (ce, correct)), grads) of transformer.var_loss, eval mode."""
    _, _, var, params = tiny
    labels, targets = golden['var_io/label_B'], golden['vae_io/idx_BL']

    @jax.jit
    def fn(params, x, weights):
        return jax.value_and_grad(
            lambda p: transformer.var_loss(var, p, labels, x, targets, weights, train=False), has_aux=True
        )(params)

    return var, params, fn


def test_var_loss_and_grads_match_official(golden, golden_grad):
    from var_jax import convert

    var, params, fn = golden_grad
    L = golden['vae_io/idx_BL'].shape[1]
    (loss, (ce, _)), grads = fn(params, golden['var_io/x_BLCv_wo_first_l'], np.full(L, 1 / L, np.float32))
    np.testing.assert_allclose(loss, golden['train/loss'], rtol=1e-4)
    np.testing.assert_allclose(np.mean(ce), golden['train/loss'], rtol=1e-4)
    ref = convert.state_dict_to_params(
        golden_state_dict(golden, 'train/grad/'), jax.eval_shape(lambda: params), convert._VAR_BUFFERS
    )
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert len(flat) == len(flat_ref) > 20
    for path, g in flat:
        r = np.asarray(flat_ref[path])
        assert np.abs(r).max() > 0, jax.tree_util.keystr(path)
        err = np.abs(np.asarray(g) - r).max()
        assert err <= 1e-4 * np.abs(r).max(), f'{jax.tree_util.keystr(path)}: max error {err}'


def test_label_smoothing_is_torchs():
    """torch CrossEntropyLoss(label_smoothing=e): (1 - e) * CE + e * mean over classes of -log p,
    weighted by token and averaged over the batch (on given logits: a stub stands in for the VAR)."""
    rng = np.random.default_rng(0)
    B, L, V, eps = 3, 5, 7, 0.1
    logits = rng.normal(size=(B, L, V)) * 3
    targets = rng.integers(0, V, (B, L))
    weights = rng.uniform(0, 1, L).astype(np.float32)

    class Stub:
        def apply(self, variables, labels, x, train=False, rngs=None):
            return jnp.asarray(logits, jnp.float32)

    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    for e in (0.0, eps):
        ce = (1 - e) * nll + e * -logp.mean(-1)
        loss, (got_ce, correct) = transformer.var_loss(Stub(), {}, None, None, targets, weights, label_smoothing=e)
        np.testing.assert_allclose(loss, (ce * weights).sum(-1).mean(), rtol=1e-5)
        np.testing.assert_allclose(got_ce, ce, rtol=1e-5)
        np.testing.assert_array_equal(correct, logits.argmax(-1) == targets)


def test_masked_scales_equal_truncation(golden, golden_grad):
    """Zero weights after scale si (progressive training) equal truncating the sequence: the loss and
    every gradient ignore the inputs of the later scales (block-causal attention)."""
    var, params, fn = golden_grad
    x = golden['var_io/x_BLCv_wo_first_l']
    ed, L = sum(p * p for p in var.patch_nums[:3]), sum(p * p for p in var.patch_nums)
    cut = transformer.progressive_token_weights(var.patch_nums, 0, 100, 10, pg=0.5, pg0=2, pgwp_steps=1)
    assert cut.shape == (ed,) and cut.min() > 0
    w = np.pad(cut, (0, L - ed))  # the masked full-length form of the stage
    x2 = x.copy()
    x2[:, ed - 1 :] = np.random.default_rng(0).normal(size=x2[:, ed - 1 :].shape)  # inputs of tokens >= ed
    (l1, _), g1 = fn(params, x, w)
    (l2, _), g2 = fn(params, x2, w)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), g1, g2)
    full = np.full_like(w, 1 / len(w))  # without the mask the perturbation is seen
    (l3, _), _ = fn(params, x, full)
    (l4, _), _ = fn(params, x2, full)
    assert abs(float(l3) - float(l4)) > 1e-3
