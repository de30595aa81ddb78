"""Block-causal attention implementations (var_jax.models.attention) against a float64 NumPy reference,
and the Pallas splash kernel (in interpret mode on CPU) against the XLA path inside VAR, values and
gradients, on the golden model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.models import attention, platform
from var_jax.models.var import block_causal_mask

from attention_reference import SIZES, reference


@pytest.fixture(scope='module')
def qkv():
    L = sum(SIZES)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return tuple(jax.random.normal(kk, (2, 2, L, 64), jnp.float32) for kk in keys)  # head-major (B, H, L, hd)


def test_block_causal_mask_is_by_scale():
    m = attention.block_causal((1, 4, 9))
    assert m.shape == (14, 14)
    assert m[0, 0] and not m[0, 1:].any()  # the first token sees only itself
    assert m[1:5, :5].all() and not m[1:5, 5:].any()  # scale 1 sees scales 0 and 1 (all of its own block)
    assert m[5:].all()
    np.testing.assert_array_equal(block_causal_mask((1, 2, 3)), m)


@pytest.mark.parametrize('seq_minor', [False, True], ids=['head_major', 'seq_minor'])
@pytest.mark.parametrize('impl', ['xla', 'splash'])
def test_output_matches_reference(qkv, impl, seq_minor):
    t = (lambda x: x.swapaxes(-1, -2)) if seq_minor else (lambda x: x)
    out = jax.jit(
        lambda q, k, v: attention.attend(q, k, v, sizes=SIZES, scale=0.3, implementation=impl, seq_minor=seq_minor)
    )(*map(t, qkv))
    np.testing.assert_allclose(out, reference(*qkv, SIZES, 0.3), atol=2e-5, rtol=0)


@pytest.mark.parametrize('seq_minor', [False, True], ids=['head_major', 'seq_minor'])
def test_splash_gradients_equal_xla(qkv, seq_minor):
    t = (lambda x: x.swapaxes(-1, -2)) if seq_minor else (lambda x: x)

    def loss(impl):
        w = jax.random.normal(jax.random.PRNGKey(1), qkv[0].shape)
        return jax.jit(
            jax.grad(
                lambda q, k, v: jnp.sum(
                    attention.attend(q, k, v, sizes=SIZES, scale=0.3, implementation=impl, seq_minor=seq_minor) * w
                ),
                argnums=(0, 1, 2),
            )
        )

    g_xla, g_splash = loss('xla')(*map(t, qkv)), loss('splash')(*map(t, qkv))
    for a, b, name in zip(g_xla, g_splash, 'qkv'):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=0, err_msg=f'd{name}')


@pytest.mark.parametrize('impl', ['xla', 'splash'])
@pytest.mark.parametrize('past, n', [(0, 1), (130, 33)])  # the first scale (dense); splash over a tile edge
def test_cached_attention_matches_reference(impl, past, n):
    """The sampler's step: one scale's n queries see every key so far, the past and their own block's (no
    mask), i.e. the last block's rows of block-causal attention over (past, n), in both layouts."""
    assert (n >= attention.CACHED_SPLASH_MIN_QUERIES) == (n == 33)
    q, k, v = (
        jax.random.normal(kk, (2, 2, past + n, 64), jnp.float32) for kk in jax.random.split(jax.random.PRNGKey(2), 3)
    )
    want = reference(q, k, v, (past, n) if past else (n,), 0.3)[:, :, past:]
    for seq_minor in (False, True):
        t = (lambda x: x.swapaxes(-1, -2)) if seq_minor else (lambda x: x)
        out = jax.jit(
            lambda q, k, v: attention.attend_cached(q, k, v, scale=0.3, implementation=impl, seq_minor=seq_minor)
        )(t(q[:, :, past:]), t(k), t(v))
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=0)


def test_cached_mask_pads_to_tiles():
    m = attention.cached_mask(33, 163)
    assert m.shape == (128, 256)
    assert m[:, :163].all() and not m[:, 163:].any()  # every query (padded ones too) sees exactly the real keys


def test_splash_mask_skips_tiles_and_pads_safely():
    m = attention.splash_mask(SIZES)
    L, Lp = sum(SIZES), 384
    assert m.shape == (Lp, Lp)
    np.testing.assert_array_equal(m[:L, :L], attention.block_causal(SIZES))
    assert not m[:, L:].any()  # padded keys are never seen
    assert m[L:, :L].all()  # padded queries see every real key (finite softmax)
    tiles = m.reshape(3, 128, 3, 128).any(axis=(1, 3))
    # Tokens 0..127 end inside scale 6 (ends at 230): they need key tiles 0 and 1, not tile 2.
    np.testing.assert_array_equal(tiles, [[True, True, False], [True, True, True], [True, True, True]])


def test_auto_picks_by_platform_and_dtype():
    with platform.compile_target('tpu'):
        assert attention.resolve('auto', jnp.float32) == 'splash'
    with platform.compile_target('gpu'):
        assert attention.resolve('auto', jnp.bfloat16) == 'cudnn'
        assert attention.resolve('auto', jnp.float32) == 'xla'  # cuDNN flash attention has no float32
    with platform.compile_target('cpu'):
        assert attention.resolve('auto', jnp.bfloat16) == 'xla'
    assert attention.resolve('splash', jnp.float32) == 'splash'
    with pytest.raises(ValueError, match='attention='):
        attention.resolve('flash', jnp.float32)


def test_var_with_splash_matches_golden_logits_and_xla_gradients(golden, tiny, monkeypatch):
    """The converted official model with splash attention on sequence-minor q, k, v (as on TPU): the official
    logits, the (head-major) XLA path's gradients."""
    _, _, var, tp = tiny
    x, labels, targets = golden['var_io/x_BLCv_wo_first_l'], golden['var_io/label_B'], golden['vae_io/idx_BL']

    def loss_and_grad(model):
        def loss(p):
            logits = model.apply({'params': p}, labels, x)
            return jax.nn.logsumexp(logits, -1).mean() - jnp.take_along_axis(
                logits, targets[..., None], -1
            ).mean(), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(tp)

    with monkeypatch.context() as m:  # read when traced
        m.setattr(attention, 'sequence_minor', lambda: True)
        (_, logits), g_splash = loss_and_grad(var.clone(attention='splash'))
    np.testing.assert_allclose(logits, golden['var_io/logits_BLV'], atol=1e-4, rtol=0)
    _, g_xla = loss_and_grad(var.clone(attention='xla'))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_xla), jax.tree.leaves(g_splash)):
        assert np.abs(np.asarray(b) - a).max() <= 1e-4 * np.abs(a).max() + 1e-8, jax.tree_util.keystr(path)
