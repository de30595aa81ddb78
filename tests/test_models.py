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


def per_block(p):
    """The params with one entry per block (blocks_0, blocks_1, ...), as the official state dicts have them."""
    if 'blocks' not in p:
        return p
    from var_jax.models.stacking import unstack_blocks

    return unstack_blocks(p)


def test_phi_table_of_the_released_tokenizer():
    assert phi_index_per_scale(4, 10) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert phi_index_per_scale(10, 10) == tuple(range(10))  # one phi per scale
    assert phi_index_per_scale(1, 6) == (0,) * 6


def test_block_causal_mask_sees_own_and_coarser_scales():
    m = block_causal_mask((1, 2, 3))
    assert m.shape == (14, 14)
    assert m[0].tolist() == [True] + [False] * 13  # the 1x1 token sees only itself
    assert m[1:5, :5].all() and not m[1:5, 5:].any()  # 2x2 block: itself and the start token
    assert m[5:].all()  # the last scale sees everything


@pytest.fixture(scope='module')
def quantizer_run():
    """4 scales (non-integer area bins 5 -> 3 and 5 -> 2), 4 phis, random params with non-zero conv biases."""
    q = MultiScaleQuantizer(vocab_size=16, cvae=4, patch_nums=(1, 2, 3, 5), beta=0.25)
    f = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 4))
    shapes = jax.eval_shape(q.init, jax.random.PRNGKey(0), f)['params']  # the structure, without a compile
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), shapes)
    params['embedding'] = params['embedding'] / 0.3
    return q, params, f


def _official_quantizer_forward(torch, f_nhwc, params, patch_nums, beta, quant_resi=0.5, num_phis=4):
    """The official VectorQuantizer2.forward (using_znorm=False, PhiPartiallyShared) re-written in torch, NCHW.

    Returns (f_hat straight-through, vq loss, per-scale indices, the torch leaves for autograd).
    """
    F = torch.nn.functional
    emb = torch.tensor(np.asarray(params['embedding']), requires_grad=True)
    phis = [
        (
            torch.tensor(
                np.asarray(params[f'phis_{i}']['conv']['kernel']).transpose(3, 2, 0, 1).copy(), requires_grad=True
            ),
            torch.tensor(np.asarray(params[f'phis_{i}']['conv']['bias']), requires_grad=True),
        )
        for i in range(num_phis)
    ]
    ticks = np.linspace(1 / 3 / num_phis, 1 - 1 / 3 / num_phis, num_phis)  # the official K == 4 ticks
    f = torch.tensor(np.asarray(f_nhwc).transpose(0, 3, 1, 2).copy(), requires_grad=True)
    B, C, H, W = f.shape
    f_no_grad = f.detach()
    f_rest, f_hat = f_no_grad.clone(), torch.zeros_like(f_no_grad)
    SN, loss, idxs = len(patch_nums), 0.0, []
    for si, pn in enumerate(patch_nums):
        rest = F.interpolate(f_rest, size=(pn, pn), mode='area') if si != SN - 1 else f_rest
        rest_NC = rest.permute(0, 2, 3, 1).reshape(-1, C)
        d = rest_NC.square().sum(1, keepdim=True) + emb.data.square().sum(1) - 2 * rest_NC @ emb.data.T
        idx = torch.argmin(d, dim=1)
        h = emb[idx.view(B, pn, pn)].permute(0, 3, 1, 2)
        if si != SN - 1:
            h = F.interpolate(h, size=(H, W), mode='bicubic')
        w, b = phis[int(np.argmin(np.abs(ticks - si / (SN - 1))))]
        h = h * (1 - quant_resi) + F.conv2d(h, w, b, padding=1) * quant_resi
        f_hat = f_hat + h
        f_rest = f_rest - h
        loss = loss + F.mse_loss(f_hat.data, f) * beta + F.mse_loss(f_hat, f_no_grad)
        idxs.append(idx.numpy())
    loss = loss / SN
    f_st = (f_hat.data - f_no_grad) + f
    return f_st, loss, idxs, (emb, phis, f)


def test_quantizer_training_forward(quantizer_run):
    """Values and gradients of the training forward equal the official quantizer's (torch re-implementation)."""
    torch = pytest.importorskip('torch')
    q, params, f = quantizer_run
    pns = (1, 2, 3, 5)
    w = jax.random.normal(jax.random.PRNGKey(2), f.shape)  # a downstream loss through the straight-through output

    def objective(p, f):
        st, l, hits = q.apply({'params': p}, f)
        return l + jnp.sum(st * w), (st, l, hits)

    (_, (f_st, loss, hits)), (g_p, g_f) = jax.jit(jax.value_and_grad(objective, (0, 1), has_aux=True))(params, f)
    ref_st, ref_loss, ref_idx, (emb, phis, f_t) = _official_quantizer_forward(torch, f, params, pns, 0.25)
    np.testing.assert_allclose(np.asarray(f_st), ref_st.detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(float(loss), float(ref_loss.detach()), rtol=1e-5)
    assert hits.shape == (4, 16)
    for si, idx in enumerate(ref_idx):
        np.testing.assert_array_equal(np.asarray(hits[si]), np.bincount(idx, minlength=16))
    (ref_loss + (ref_st * torch.tensor(np.asarray(w).transpose(0, 3, 1, 2).copy())).sum()).backward()
    np.testing.assert_allclose(np.asarray(g_f), f_t.grad.numpy().transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_p['embedding']), emb.grad.numpy(), atol=1e-5)
    for i, (wt, bt) in enumerate(phis):
        conv = g_p[f'phis_{i}']['conv']
        np.testing.assert_allclose(np.asarray(conv['kernel']), wt.grad.numpy().transpose(2, 3, 1, 0), atol=1e-5)
        np.testing.assert_allclose(np.asarray(conv['bias']), bt.grad.numpy(), atol=1e-5)


def test_straight_through_and_codebook_gradients(quantizer_run):
    """Without torch too: the decoder's gradient reaches the encoder unchanged; only used codes learn."""
    q, params, f = quantizer_run
    w = jax.random.normal(jax.random.PRNGKey(2), f.shape)

    @jax.jit
    def grads(p, f):
        g_f = jax.grad(lambda f: jnp.sum(q.apply({'params': p}, f)[0] * w))(f)
        g_p = jax.grad(lambda p: q.apply({'params': p}, f)[1])(p)
        return g_f, g_p, q.apply({'params': p}, f)[2]

    g_f, g_p, hits = grads(params, f)
    np.testing.assert_allclose(g_f, w, atol=1e-6)
    used = np.asarray(hits.sum(0) > 0)
    g_code = np.abs(np.asarray(g_p['embedding'])).sum(1)
    assert (g_code[used] > 0).all() and (g_code[~used] == 0).all()
    assert all(np.abs(x).sum() > 0 for x in jax.tree.leaves(g_p['phis_0']))


def test_official_initialisation_statistics():
    var = VAR(**SMALL_VAR, vocab_size=32, cvae=8, patch_nums=(1, 2, 3, 4), init_adaln_gamma=1e-3)
    p = per_block(init_var(var))
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
    apply = jax.jit(
        lambda key, train: var.apply({'params': p}, labels, x, train=train, rngs={'dropout': key}), static_argnums=1
    )
    ev = [apply(jax.random.PRNGKey(i), False) for i in range(2)]
    np.testing.assert_array_equal(ev[0], ev[1])
    tr = [apply(jax.random.PRNGKey(i), True) for i in range(2)]
    assert np.abs(tr[0] - tr[1]).max() > 1e-4 and np.abs(tr[0] - ev[0]).max() > 1e-4


def test_shared_adaln_variant_runs_and_conditions():
    vqvae, var = api.build_models(SMALL_VAE, SMALL_VAR | dict(shared_aln=True))
    p = init_var(var)
    b0 = per_block(p)['blocks_0']
    assert 'shared_ada_lin' in p and b0['ada_gss'].shape == (6, 64) and 'ada_lin' not in b0
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
