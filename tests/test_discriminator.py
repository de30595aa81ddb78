"""The optional PatchGAN discriminator of tokenizer training and the VQGAN loss / step around it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from var_jax import losses
from var_jax.models.discriminator import PatchDiscriminator
from var_jax.models.vqvae import VQVAE
from var_jax.trainers import loop, tokenizer

L1, L2 = 0.2, 1.0


def test_patch_grid_for_32px_nhwc():
    d = PatchDiscriminator(ndf=8, n_layers=3)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1)

    @jax.jit
    def init_apply(x):
        params = d.init(jax.random.PRNGKey(0), x)['params']
        return params, d.apply({'params': params}, x)

    params, out = init_apply(x)
    # 32 -s2-> 16 -s2-> 8 -s2-> 4 -s1-> 3 -s1-> 2
    assert out.shape == (2, 2, 2, 1) and np.all(np.isfinite(out))
    k = lambda n: params[n]['kernel'].shape
    assert [k(f'conv_{i}') for i in range(4)] + [k('conv_out')] == [
        (4, 4, 3, 8),
        (4, 4, 8, 16),
        (4, 4, 16, 32),
        (4, 4, 32, 64),
        (4, 4, 64, 1),
    ]
    assert 'bias' not in params['conv_1'] and 'norm_1' in params and 'norm_0' not in params
    assert PatchDiscriminator().ndf == 64 and PatchDiscriminator().n_layers == 3
    with pytest.raises(ValueError, match='NHWC'):
        d.apply({'params': params}, jnp.zeros((2, 3, 32, 32)))


def test_hinge_and_generator_losses():
    real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - x) = 0, 0.5, 2   -> mean 5/6
    fake = jnp.array([-2.0, 0.0, 1.0])  # relu(1 + x) = 0, 1, 2     -> mean 1
    np.testing.assert_allclose(losses.hinge_d_loss(real, fake), (5 / 6 + 1) / 2, rtol=1e-6)
    np.testing.assert_allclose(losses.generator_adv_loss(fake), 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(losses.adaptive_weight(jnp.full((4,), 3.0), jnp.zeros(4), 0.5), 0.5 * 1e4)


@pytest.fixture(scope='module')
def setup():
    # The VQVAE and init of tests/test_tokenizer.py: that module loads this init from the compilation cache.
    vqvae = VQVAE(
        vocab_size=64,
        z_channels=8,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        patch_nums=(1, 2, 4),
        using_sa=False,
        using_mid_sa=False,
    )
    disc = PatchDiscriminator(ndf=8, n_layers=1)
    image = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), minval=-1, maxval=1)
    params = jax.jit(vqvae.init)(jax.random.PRNGKey(0), image)['params']
    tx = optax.adam(1e-3)
    dtx = tokenizer.make_disc_optimizer(1e-3)
    state = loop.new_state(params, tx, 0) | jax.jit(lambda: tokenizer.new_disc_state(disc, dtx, 8, 0))()
    return vqvae, disc, tx, dtx, state, {'image': image}


DISC_START = 1


@pytest.fixture(scope='module')
def gan_step(setup):
    """The GAN step with disc_start 1, compiled once: from state step 0 it is the step before the
    discriminator starts, from state step 1 the first one after (both sides of the boundary)."""
    vqvae, disc, tx, dtx, _, _ = setup
    return jax.jit(
        tokenizer.make_step(vqvae, tx, L1, L2, disc=disc, disc_tx=dtx, disc_weight=0.5, disc_start=DISC_START)
    )


@pytest.fixture(scope='module')
def started(setup, gan_step):
    """The GAN step at state step disc_start (the params are the initial ones)."""
    _, _, _, _, state, batch = setup
    return gan_step(dict(state, step=state['step'] + DISC_START), batch)


@pytest.fixture(scope='module')
def plain(setup):
    vqvae, _, tx, _, state, batch = setup
    plain_state = {k: v for k, v in state.items() if not k.startswith('disc_')}
    return jax.jit(tokenizer.make_step(vqvae, tx, L1, L2))(plain_state, batch)


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms(setup, started):
    vqvae, disc, _, _, state, batch = setup
    new, m = started
    x = batch['image']

    def rec(p):
        return vqvae.apply({'params': p}, x)[0]

    nll = lambda p: L1 * jnp.mean(jnp.abs(rec(p) - x)) + L2 * jnp.mean(jnp.square(rec(p) - x))
    g = lambda p: -jnp.mean(disc.apply({'params': state['disc_params']}, rec(p)))

    vq = lambda p: vqvae.apply({'params': p}, x)[1]

    @jax.jit
    def reference(p):
        gn = jnp.linalg.norm(jax.grad(nll)(p)['decoder']['conv_out']['kernel'])
        gg = jnp.linalg.norm(jax.grad(g)(p)['decoder']['conv_out']['kernel'])
        return gn, gg, nll(p), g(p), vq(p)

    gn, gg, nll_v, g_v, vq_v = reference(state['params'])
    assert gn > 0 and gg > 0
    # VQGAN (taming calculate_adaptive_weight): ||d nll/d W|| / (||d g/d W|| + 1e-4), clamped to [0, 1e4],
    # times the discriminator weight, W the decoder's last layer.
    expected = 0.5 * np.clip(gn / (gg + 1e-4), 0, 1e4)
    np.testing.assert_allclose(m['disc_weight_adaptive'], expected, rtol=1e-4)
    np.testing.assert_allclose(m['g_loss'], g_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m['loss'], nll_v + expected * g_v + vq_v, rtol=1e-5)
    # The generator's gradient is that of nll + lambda * g + vq with lambda held constant.
    total = lambda p: nll(p) + expected * g(p) + vq(p)
    np.testing.assert_allclose(m['grad_norm'], optax.tree.norm(jax.jit(jax.grad(total))(state['params'])), rtol=1e-4)


def test_disc_weight_zero_is_the_plain_step(setup):
    # Same program as make_vae_step's defaults (so same loss / params), no discriminator state read.
    vqvae, disc, tx, dtx, state, batch = setup
    plain_state = {k: v for k, v in state.items() if not k.startswith('disc_')}
    off = tokenizer.make_step(vqvae, tx, L1, L2, 0, disc=disc, disc_tx=dtx, disc_weight=0.0, disc_start=0)
    default = tokenizer.make_step(vqvae, tx, L1, L2)
    assert str(jax.make_jaxpr(off)(plain_state, batch)) == str(jax.make_jaxpr(default)(plain_state, batch))


def test_after_disc_start_both_models_train(setup, started):
    _, _, _, _, state, _ = setup
    new, m = started
    for k in ('loss', 'g_loss', 'd_loss', 'disc_weight_adaptive', 'logits_real', 'logits_fake', 'grad_norm'):
        assert np.isfinite(m[k]), k
    assert m['disc_weight_adaptive'] > 0 and not bool(new['nonfinite'])
    changed = lambda a, b: any(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.any(x != y)), a, b)))
    assert changed(new['params'], state['params'])
    assert changed(new['disc_params'], state['disc_params'])
    assert int(new['disc_opt_state'][0].count) == 1


def test_before_disc_start_the_generator_step_is_the_plain_one(setup, plain, gan_step):
    _, _, _, _, state, batch = setup
    assert int(state['step']) == DISC_START - 1
    new, m = gan_step(state, batch)
    ref, ref_m = plain
    assert float(m['disc_weight_adaptive']) == 0.0
    np.testing.assert_allclose(m['loss'], ref_m['loss'], rtol=1e-6)
    np.testing.assert_allclose(m['grad_norm'], ref_m['grad_norm'], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new['params'], ref['params'])
    jax.tree.map(np.testing.assert_array_equal, new['disc_params'], state['disc_params'])
    jax.tree.map(np.testing.assert_array_equal, new['disc_opt_state'], state['disc_opt_state'])


def test_too_deep_for_the_image_size_is_named():
    with pytest.raises(ValueError, match=r'8 px images are too small.*disc_layers to at most 1'):
        PatchDiscriminator(ndf=8, n_layers=3).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
