"""Model behaviour beyond the golden fixture: quantizer training forward, init, NNX, bad input."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import api
from var_jax.models.quantizer import MultiScaleQuantizer, phi_index_per_scale
from var_jax.models.var import VAR, block_causal_mask

SMALL_VAE = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2, 3, 4))
SMALL_VAR = dict(depth=2, embed_dim=64, num_heads=4, num_classes=5)


def init_var(var):
    return jax.jit(var.init)(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 29, 8)))['params']


def test_phi_table_of_the_released_tokenizer():
    assert phi_index_per_scale(4, 10) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert phi_index_per_scale(10, 10) == tuple(range(10))  # one phi per scale
    assert phi_index_per_scale(1, 6) == (0,) * 6


def test_block_causal_mask_sees_own_and_coarser_scales():
    m = block_causal_mask((1, 2, 3))
    assert m.shape == (14, 14)
    assert m[0].tolist() == [True] + [False] * 13          # the 1x1 token sees only itself
    assert m[1:5, :5].all() and not m[1:5, 5:].any()       # 2x2 block: itself and the start token
    assert m[5:].all()                                     # the last scale sees everything


@pytest.fixture(scope='module')
def quantizer_run():
    q = MultiScaleQuantizer(vocab_size=16, cvae=4, patch_nums=(1, 2, 4), beta=0.25)
    f = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 4))
    params = jax.jit(q.init)(jax.random.PRNGKey(0), f)['params']
    return q, params, f


def test_quantizer_training_forward(quantizer_run):
    q, params, f = quantizer_run
    f_st, loss, hits = q.apply({'params': params}, f)
    _, fhats = q.apply({'params': params}, f, True, method=MultiScaleQuantizer.f_to_idx)
    np.testing.assert_allclose(f_st, fhats[-1], atol=1e-6)  # straight-through value = f_hat
    # vq loss: (1 + beta) * MSE(f_hat_k, f) averaged over scales in value.
    ref = np.mean([(1.25) * np.mean((np.asarray(h) - np.asarray(f)) ** 2) for h in fhats])
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert hits.shape == (3, 16) and hits.sum(axis=1).tolist() == [2 * 1, 2 * 4, 2 * 16]


def test_straight_through_and_codebook_gradients(quantizer_run):
    q, params, f = quantizer_run
    w = jax.random.normal(jax.random.PRNGKey(2), f.shape)
    g_f = jax.grad(lambda f: jnp.sum(q.apply({'params': params}, f)[0] * w))(f)
    np.testing.assert_allclose(g_f, w, atol=1e-6)  # the decoder's gradient passes to the encoder
    g_p = jax.grad(lambda p: q.apply({'params': p}, f)[1])(params)
    used = np.asarray(q.apply({'params': params}, f)[2].sum(0) > 0)
    g_code = np.abs(np.asarray(g_p['embedding'])).sum(1)
    assert (g_code[used] > 0).all() and (g_code[~used] == 0).all()
    assert all(np.abs(x).sum() > 0 for x in jax.tree.leaves(g_p['phis_0']))


def test_official_initialisation_statistics():
    var = VAR(**SMALL_VAR, vocab_size=32, cvae=8, patch_nums=(1, 2, 3, 4), init_adaln_gamma=1e-3)
    p = init_var(var)
    std = math.sqrt(1 / (3 * 64))
    np.testing.assert_allclose(np.std(p['class_emb']['embedding']), std, rtol=0.1)
    np.testing.assert_allclose(np.std(p['head']['kernel']), 0.02 * std, rtol=0.1)
    np.testing.assert_allclose(np.std(p['blocks_0']['attn']['proj']['kernel']), std / 2, rtol=0.1)
    ada = np.asarray(p['blocks_0']['ada_lin']['kernel'])  # (C, 6C): gammas, scales, shifts
    np.testing.assert_allclose(np.std(ada[:, :128]), 1e-3 * std, rtol=0.1)
    np.testing.assert_allclose(np.std(ada[:, 128:]), 0.5 * std, rtol=0.1)
    np.testing.assert_allclose(p['blocks_0']['attn']['scale_mul'], np.log(4.0))
    assert not np.asarray(p['head']['bias']).any() and not np.asarray(p['blocks_1']['attn']['q_bias']).any()


def test_train_mode_drops_labels_and_paths_eval_does_not():
    vqvae, var = api.build_models(SMALL_VAE, SMALL_VAR | dict(drop_path_rate=0.5, cond_drop_rate=0.5))
    p = init_var(var)
    # Move the AdaLN gammas off ~0 so that blocks and labels matter.
    p = jax.tree.map(lambda x: x + 0.05, p)
    labels, x = jnp.arange(4) % 5, jax.random.normal(jax.random.PRNGKey(1), (4, 29, 8))
    apply = jax.jit(lambda key, train: var.apply({'params': p}, labels, x, train=train, rngs={'dropout': key}),
                    static_argnums=1)
    ev = [apply(jax.random.PRNGKey(i), False) for i in range(2)]
    np.testing.assert_array_equal(ev[0], ev[1])
    tr = [apply(jax.random.PRNGKey(i), True) for i in range(2)]
    assert np.abs(tr[0] - tr[1]).max() > 1e-4 and np.abs(tr[0] - ev[0]).max() > 1e-4


def test_shared_adaln_variant_runs_and_conditions():
    vqvae, var = api.build_models(SMALL_VAE, SMALL_VAR | dict(shared_aln=True))
    p = init_var(var)
    assert 'shared_ada_lin' in p and p['blocks_0']['ada_gss'].shape == (6, 64) and 'ada_lin' not in p['blocks_0']
    x = jnp.zeros((2, 29, 8))
    apply = jax.jit(var.apply)
    a, b = (apply({'params': p}, jnp.array([l, l]), x) for l in (0, 1))
    assert np.abs(a - b).max() > 0


def test_flax_modules_run_inside_nnx():
    from flax import nnx
    from flax.nnx import bridge
    vqvae, var = api.build_models(SMALL_VAE, SMALL_VAR)
    model = bridge.ToNNX(var, rngs=nnx.Rngs(0))
    labels, x = jnp.array([1, 2]), jax.random.normal(jax.random.PRNGKey(3), (2, 29, 8))
    bridge.lazy_init(model, labels, x)
    out = model(labels, x)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_allclose(out, var.apply({'params': params}, labels, x), atol=1e-6)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match='divisible by num_heads'):
        init_var(api.build_models(SMALL_VAE, SMALL_VAR | dict(num_heads=3))[1])
    with pytest.raises(ValueError, match='strictly increasing'):
        api.init_params(*api.build_models(SMALL_VAE | dict(patch_nums=(1, 3, 2, 4)), SMALL_VAR), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match='differs from the tokenizer'):
        api.build_models(SMALL_VAE, SMALL_VAR | dict(vocab_size=64))
    with pytest.raises(ValueError, match='multiple of 32'):
        api.init_params(*api.build_models(SMALL_VAE | dict(ch=48), SMALL_VAR), jax.random.PRNGKey(0))


def test_latent_must_match_the_last_patch_size():
    q = MultiScaleQuantizer(vocab_size=16, cvae=4, patch_nums=(1, 2, 4))
    with pytest.raises(ValueError, match='last patch size must equal the latent side'):
        q.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)))


def test_bad_images_and_labels_are_named(tiny, golden):
    vqvae, vp, var, tp = tiny
    img = golden['vae_io/img_B3HW']
    with pytest.raises(ValueError, match=r'NHWC.*transpose'):
        api.encode(vqvae, vp, img)
    with pytest.raises(ValueError, match=r'\(B, 32, 32, 3\)'):
        api.encode(vqvae, vp, np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r'\[-1, 1\].*127.5'):
        api.encode(vqvae, vp, np.full((1, 32, 32, 3), 255.0, np.float32))
    idx = [np.zeros((1, p * p), np.int32) for p in (1, 2, 4, 8)]
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 11\)'):
        api.teacher_forcing_logits(vqvae, vp, var, tp, idx, np.array([12]))
    with pytest.raises(ValueError, match='one \\(B, pn\\^2\\) index array per scale'):
        api.decode(vqvae, vp, idx[:3])
