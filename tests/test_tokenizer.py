"""The tokenizer stage's dead-code restart: never-hit codes are re-seeded from the batch's latents."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from var_jax.models.vqvae import VQVAE
from var_jax.trainers import loop, tokenizer


def test_dead_code_restart_reseeds_only_unused_codes():
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
    images = [jax.random.uniform(jax.random.PRNGKey(i), (2, 8, 8, 3), minval=-1, maxval=1) for i in (1, 2)]
    params = jax.jit(vqvae.init)(jax.random.PRNGKey(0), images[0])['params']
    tx = optax.adam(1e-3)
    state = loop.new_state(params, tx, 0) | {'code_hits': jnp.zeros((64,), jnp.int32)}
    plain = jax.jit(tokenizer.make_step(vqvae, tx, 0.2, 1.0, restart_every=0))
    restart = jax.jit(tokenizer.make_step(vqvae, tx, 0.2, 1.0, restart_every=2))
    forward = jax.jit(lambda p, x: vqvae.apply({'params': p}, x))

    # Step 1 is a restart step: codes no scale hit in this batch are replaced by latent vectors of the batch.
    _, _, hits, f = forward(params, images[0])
    hit = np.asarray(hits).sum(0) > 0
    assert 0 < hit.sum() < 64
    ref, _ = plain(state, {'image': images[0]})
    new, _ = restart(state, {'image': images[0]})
    book, ref_book = (
        np.asarray(new['params']['quantize']['embedding']),
        np.asarray(ref['params']['quantize']['embedding']),
    )
    np.testing.assert_array_equal(book[hit], ref_book[hit])  # used codes: the plain Adam update
    latents = np.asarray(f).reshape(-1, 8)
    for row in book[~hit]:  # dead codes: a latent vector of this batch each
        assert np.min(np.abs(latents - row).max(axis=1)) == 0
    assert not np.allclose(book[~hit], ref_book[~hit])
    assert int(np.asarray(new['code_hits']).sum()) == 0  # the hit counts restart with the window

    # Step 2 is not a restart step: the codebook gets the plain update and this batch's hits are counted.
    _, _, hits2, _ = forward(new['params'], images[1])
    ref2, _ = plain(new, {'image': images[1]})
    new2, _ = restart(new, {'image': images[1]})
    np.testing.assert_array_equal(new2['params']['quantize']['embedding'], ref2['params']['quantize']['embedding'])
    np.testing.assert_array_equal(new2['code_hits'], np.asarray(hits2).sum(0))
