"""Gradient accumulation (transformer.grad_accum, the official --ac): k micro-batches make the full batch's update."""

import jax
import numpy as np
import optax
import pytest

from var_jax.trainers import loop, transformer

import train_worker


@pytest.fixture(scope='module')
def steps():
    """The tiny training worker's models without dropout (deterministic), plain SGD (the update is the gradient)."""
    vqvae, var, _, vae_params, var_params, batch, weights = train_worker.build()
    var = var.clone(drop_path_rate=0.0, cond_drop_rate=0.0)
    tx = optax.sgd(1.0)
    state = loop.new_state(var_params, tx, 0)

    def run(k):
        new, metrics = jax.jit(transformer.make_step(vqvae, var, tx, 0.1, grad_accum=k))(
            state, vae_params, batch, weights
        )
        return jax.device_get((new['params'], metrics))

    return run, state


def test_micro_batches_give_the_full_batch_update(steps):
    run, state = steps
    full_params, full = run(1)
    moved = max(
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(jax.device_get(state['params'])))
    )
    assert moved > 1e-4  # the step did change the params
    for k in (2, 4):
        params, metrics = run(k)
        for key in ('loss', 'grad_norm', 'Lm', 'Accm', 'L_4'):
            np.testing.assert_allclose(metrics[key], full[key], rtol=2e-5, err_msg=f'k={k} {key}')
        for path, a in jax.tree_util.tree_leaves_with_path(params):
            b = full_params
            for p in path:
                b = b[p.key]
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f'k={k} {jax.tree_util.keystr(path)}')


def test_micro_batches_split_every_example_once():
    batch = {'image': np.arange(8 * 2).reshape(8, 2), 'label': np.arange(8)}
    mb = transformer.micro_batches(batch, 4)
    assert mb['image'].shape == (4, 2, 2) and mb['label'].shape == (4, 2)
    assert sorted(mb['label'].ravel()) == list(range(8)) and list(mb['label'][1]) == [1, 5]
    np.testing.assert_array_equal(mb['image'][1, 1], batch['image'][5])
