"""Sharded training steps (data parallel, FSDP) against one device, in the 4-device worker (tests/train_runs.py)."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from var_jax import optim
from var_jax.trainers import loop

import train_worker
from official_schedules import official_lr


# =============================================================================================
# Sharded step equivalence and the non-finite guard of the step, one 4-device subprocess
# =============================================================================================
def test_sharded_steps_equal_single_device(sharded):
    res, _ = sharded
    assert res['n_devices'] == 4
    meshes = res['meshes']
    assert {k: v['mesh_shape'] for k, v in meshes.items()} == {
        '1dev': {'data': 1, 'fsdp': 1},
        'dp4': {'data': 4, 'fsdp': 1},
        'fsdp2': {'data': 2, 'fsdp': 2},
        'fsdp4': {'data': 1, 'fsdp': 4},
    }
    # FSDP really split the params (and their Adam moments): the blocks' stacked mat_qkv (2, 64, 192) along
    # its 192 columns.
    assert meshes['fsdp2']['qkv_spec'] == meshes['fsdp4']['qkv_spec'] == "(None, None, 'fsdp')"
    assert meshes['fsdp2']['qkv_shard_shape'] == [2, 64, 96] and meshes['fsdp4']['qkv_shard_shape'] == [2, 64, 48]
    assert meshes['fsdp4']['n_split_leaves'] > meshes['fsdp4']['n_leaves'] // 2
    assert meshes['dp4']['n_split_leaves'] == 0
    ref = meshes['1dev']
    assert ref['params_moved'] > 1e-3  # the two steps did update the params
    for name, m in meshes.items():
        assert m['step'] == train_worker.NUM_STEPS and not m['nonfinite'] and m['rng_equal']
        for i, (got, want) in enumerate(zip(m['metrics'], ref['metrics'])):
            for k in want:  # loss, grad_norm, per-scale losses and accuracies, lr
                np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=f'{name} step {i} {k}')
        assert m['max_param_diff'] <= 1e-5, (name, m['worst_param'], m['max_param_diff'])
        assert m['max_opt_diff'] <= 1e-5, name


def test_fsdp4_checkpoint_restores_on_one_device(sharded):
    from var_jax import api, sharding
    from var_jax.checkpoint import Checkpointer

    _, out = sharded
    vqvae, var = api.build_models(train_worker.VAE, train_worker.VAR)
    tx = optim.make_optimizer(
        ml_collections.ConfigDict(train_worker.OPTIM), train_worker.TOTAL_STEPS, train_worker.BATCH
    )
    L = sum(p * p for p in var.patch_nums)
    abstract = jax.eval_shape(
        lambda: loop.new_state(
            var.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, L - 1, var.cvae)))['params'],
            tx,
            train_worker.SEED,
        )
    )
    mesh = sharding.make_mesh(1, jax.devices()[:1])
    target = sharding.with_shardings(abstract, sharding.param_sharding(mesh, abstract))
    with Checkpointer(os.path.join(out, 'ckpt')) as ckpt:
        assert ckpt.all_steps() == [train_worker.NUM_STEPS]
        restored = ckpt.restore(target)
    want = dict(np.load(os.path.join(out, 'arrays.npz')))
    got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(restored)}
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert len(v.sharding.device_set) == 1, k
        np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=k)
    assert int(restored['step']) == train_worker.NUM_STEPS


def test_step_skips_nonfinite_updates(sharded):
    g = sharded[0]['guard']
    assert not g['finite']['nonfinite'] and not g['finite']['params_unchanged']
    for case in ('nan_param', 'huge_param'):  # NaN loss; finite loss with an Inf gradient
        r = g[case]
        assert r['nonfinite'] and r['params_unchanged'] and r['opt_state_unchanged'], (case, r)
        assert r['step'] == 1, (case, r)  # the batch is consumed
    assert math.isinf(g['huge_param']['grad_norm']) and math.isfinite(g['huge_param']['loss'])
    r = g['finite_after_nan']  # the flag stays raised until fit looks at it
    assert r['nonfinite'] and not r['params_unchanged'] and r['step'] == 2


def test_step_flags_nan_images(sharded):
    r = sharded[0]['guard']['nan_images']
    assert r['nonfinite'] and r['params_unchanged'], r


def test_logged_lr_is_the_lr_of_the_step(sharded):
    """The lr a step logs is the official lr of that step (step 0: warm-up start), written out independently."""
    o = train_worker.OPTIM
    peak = o['tblr'] * train_worker.BATCH / 256
    logged = [m['lr'] for m in sharded[0]['meshes']['1dev']['metrics']]
    want = [
        official_lr(s, peak, o['warmup_steps'], train_worker.TOTAL_STEPS, o['wp0'], o['wpe'])
        for s in range(len(logged))
    ]
    assert len(logged) == train_worker.NUM_STEPS and want[0] != want[1]
    np.testing.assert_allclose(logged, want, rtol=1e-6)


def test_truncated_progressive_step_equals_the_masked_full_step(sharded):
    """A progressive stage runs on the sequence cut at its last scale (the compute saving); its loss and
    update equal the full-length step with the later tokens weighted 0 (block-causal attention).
    (Run in the sharded worker: the full-length step is its 1-device executable.)"""
    res, out = sharded
    assert list(res['truncated']) == ['5']  # patch_nums (1, 2, 4): the stage of scales 1 and 2
    for end, m in res['truncated'].items():
        cut, full = m['cut'], m['full']
        np.testing.assert_allclose(cut['loss'], full['loss'], rtol=1e-5)
        np.testing.assert_allclose(cut['grad_norm'], full['grad_norm'], rtol=1e-4)
        with np.load(os.path.join(out, f'truncated_{end}.npz')) as f:
            params = {k: f[k] for k in f.files}
        keys = [k[len('cut') :] for k in params if k.startswith('cut')]
        assert len(keys) > 20 and sorted(f'full{k}' for k in keys) == sorted(k for k in params if k.startswith('full'))
        for k in keys:
            np.testing.assert_allclose(params['cut' + k], params['full' + k], rtol=1e-4, atol=1e-6, err_msg=k)
        assert math.isnan(cut['Lt']) and math.isfinite(full['Lt'])  # the finest scale is not trained yet
