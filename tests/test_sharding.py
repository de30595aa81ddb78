"""Tests for var_jax.sharding.

Multi-device behaviour is checked in ONE subprocess with 4 simulated CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=4), so this pytest
process keeps its single device.  The subprocess is this very file run as a
script: it runs every check and prints one JSON line that the tests inspect.
"""

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DEVICES = 4


# ----------------------------------------------------------------------------
# Worker (runs in the 4-device subprocess)
# ----------------------------------------------------------------------------


def _spec(sharding):
    return str(tuple(sharding.spec))


def _check_meshes(sh):
    import jax

    out = {str(f): list(sh.make_mesh(f).devices.shape) for f in (1, 2, 4)}
    out['axis_names'] = list(sh.make_mesh(2).axis_names)
    try:
        sh.make_mesh(3)
        out['fsdp3_error'] = None
    except ValueError as e:
        out['fsdp3_error'] = str(e)
    out['n_devices'] = len(jax.devices())
    return out


def _check_param_sharding(sh):
    import jax
    import jax.numpy as jnp
    import optax

    abstract = {
        'wide': jax.ShapeDtypeStruct((8, 64), jnp.float32),  # largest dim is 1
        'tall': jax.ShapeDtypeStruct((128, 6), jnp.float32),  # largest dim is 0
        'skip': jax.ShapeDtypeStruct((30, 12), jnp.float32),  # 30 % 4 != 0 -> dim 1
        'indivisible': jax.ShapeDtypeStruct((257, 3), jnp.float32),
        'small': jax.ShapeDtypeStruct((4, 4), jnp.float32),
        'scalar': jax.ShapeDtypeStruct((), jnp.int32),
    }
    out = {}
    for fsdp in (1, 2, 4):
        mesh = sh.make_mesh(fsdp)
        out[str(fsdp)] = {k: _spec(s) for k, s in sh.param_sharding(mesh, abstract, min_size=256).items()}
    # Optimizer state: Adam moments shard like their params, count replicated.
    mesh = sh.make_mesh(4)
    params = {'wide': abstract['wide'], 'small': abstract['small']}
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    opt_sh = sh.param_sharding(mesh, opt_state, min_size=256)
    adam = opt_sh[0]
    out['adam'] = {
        'mu_wide': _spec(adam.mu['wide']),
        'nu_wide': _spec(adam.nu['wide']),
        'mu_small': _spec(adam.mu['small']),
        'count': _spec(adam.count),
    }
    return out


def _check_init_sharded(sh):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(32)(nn.gelu(nn.Dense(64)(x)))

    model = MLP()
    mesh = sh.make_mesh(4)
    variables, shardings = sh.init_sharded(model.init, mesh, jax.random.PRNGKey(0), jnp.ones((2, 16)), min_size=512)
    flat_v = jax.tree_util.tree_leaves_with_path(variables)
    flat_s = jax.tree.leaves(shardings)
    out = {'match': True, 'specs': {}, 'shard_shapes': {}}
    for (path, arr), s in zip(flat_v, flat_s):
        key = jax.tree_util.keystr(path)
        out['match'] &= arr.sharding.is_equivalent_to(s, arr.ndim)
        out['specs'][key] = _spec(arr.sharding)
        out['shard_shapes'][key] = list(arr.addressable_shards[0].data.shape)
    # Same values as an ordinary (unsharded) init.
    ref = model.init(jax.random.PRNGKey(0), jnp.ones((2, 16)))
    out['same_values'] = bool(
        all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), variables, ref)))
    )
    return out


def _check_train_step(sh):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    rng = np.random.default_rng(0)
    batch = {'x': rng.normal(size=(16, 32)).astype(np.float32), 'y': rng.normal(size=(16, 16)).astype(np.float32)}
    params = {'w': jnp.asarray(rng.normal(size=(32, 16)) * 0.1, jnp.float32), 'b': jnp.zeros((16,), jnp.float32)}
    tx = optax.adamw(1e-2, weight_decay=1e-2)

    def loss_fn(p, b):
        return jnp.mean((b['x'] @ p['w'] + p['b'] - b['y']) ** 2)

    def step(state, b):
        loss, grads = jax.value_and_grad(loss_fn)(state['params'], b)
        updates, opt = tx.update(grads, state['opt'], state['params'])
        return {'params': optax.apply_updates(state['params'], updates), 'opt': opt}, loss

    n_steps = 3
    init = {'params': params, 'opt': tx.init(params)}

    # Reference: one device, no sharding.
    ref_state, ref_losses = init, []
    ref_step = jax.jit(step)
    for _ in range(n_steps):
        ref_state, loss = ref_step(ref_state, batch)
        ref_losses.append(float(loss))

    out = {'ref_losses': ref_losses}
    for fsdp in (1, 2, 4):
        mesh = sh.make_mesh(fsdp)
        state_sh = sh.param_sharding(mesh, init, min_size=128)
        state = jax.device_put(init, state_sh)
        b = sh.global_batch(batch, mesh)
        train_step = jax.jit(
            step,
            in_shardings=(state_sh, sh.batch_sharding(mesh)),
            out_shardings=(state_sh, sh.replicated(mesh)),
        )
        losses = []
        for _ in range(n_steps):
            state, loss = train_step(state, b)
            losses.append(float(loss))
        diff = max(
            float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(r))))
            for a, r in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state))
        )
        out[str(fsdp)] = {
            'losses': losses,
            'max_state_diff': diff,
            'w_spec': _spec(state['params']['w'].sharding),
            'mu_w_spec': _spec(state['opt'][0].mu['w'].sharding),
            'b_spec': _spec(state['params']['b'].sharding),
        }
    return out


def _check_global_batch(sh):
    import numpy as np

    mesh = sh.make_mesh(2)
    local = {'image': np.arange(8 * 3 * 4 * 4, dtype=np.float32).reshape(8, 3, 4, 4), 'label': np.arange(8)}
    g = sh.global_batch(local, mesh)
    return {
        'image_shape': list(g['image'].shape),
        'label_shape': list(g['label'].shape),
        'is_batch_sharded': g['image'].sharding.is_equivalent_to(sh.batch_sharding(mesh), 4),
        'n_shards': len(g['image'].addressable_shards),
        'shard_shape': list(g['image'].addressable_shards[0].data.shape),
        'values_equal': bool(np.array_equal(np.asarray(g['image']), local['image']))
        and bool(np.array_equal(np.asarray(g['label']), local['label'])),
    }


def _worker_main():
    from var_jax import sharding as sh

    results = {
        'meshes': _check_meshes(sh),
        'param_sharding': _check_param_sharding(sh),
        'init_sharded': _check_init_sharded(sh),
        'train_step': _check_train_step(sh),
        'global_batch': _check_global_batch(sh),
        'imports_tensorflow': 'tensorflow' in sys.modules,
    }
    print('RESULT ' + json.dumps(results))


# ----------------------------------------------------------------------------
# Tests (main pytest process, 1 device)
# ----------------------------------------------------------------------------


def start_background(jobs, items, tmp_path_factory, config):
    """tests/conftest.py (background_jobs) calls this before the session's first test: the worker runs on the
    session's background lane while the tests before this module run."""
    if any('worker' in item.fixturenames for item in items):
        jobs.submit(_run_worker, name='sharding_worker')


@pytest.fixture(scope='module')
def worker(background_jobs):
    return background_jobs.result('sharding_worker')


def _run_worker():
    from conftest import ENVIRON  # (not at the top: this file is also the worker script)

    env = dict(ENVIRON)  # the session's, not what a test running meanwhile set
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={N_DEVICES}').strip()
    env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONPATH'] = REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    assert proc.returncode == 0 and lines, f'worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    return json.loads(lines[-1][len('RESULT ') :])


def test_mesh_shapes(worker):
    m = worker['meshes']
    assert m['n_devices'] == N_DEVICES
    assert m['1'] == [4, 1] and m['2'] == [2, 2] and m['4'] == [1, 4]
    assert m['axis_names'] == ['data', 'fsdp']
    assert m['fsdp3_error'] and 'fsdp=3' in m['fsdp3_error']


def test_param_sharding_rule(worker):
    ps = worker['param_sharding']
    rep = '()'
    assert all(v == rep for v in ps['1'].values()), ps['1']
    assert ps['2'] == {
        'wide': "(None, 'fsdp')",
        'tall': "('fsdp', None)",
        'skip': "('fsdp', None)",  # 30 is even -> largest divisible dim
        'indivisible': rep,
        'small': rep,
        'scalar': rep,
    }
    assert ps['4'] == {
        'wide': "(None, 'fsdp')",
        'tall': "('fsdp', None)",
        'skip': "(None, 'fsdp')",  # 30 % 4 != 0 -> falls back to 12
        'indivisible': rep,
        'small': rep,
        'scalar': rep,
    }
    assert ps['adam'] == {'mu_wide': "(None, 'fsdp')", 'nu_wide': "(None, 'fsdp')", 'mu_small': rep, 'count': rep}


def test_init_sharded(worker):
    r = worker['init_sharded']
    assert r['match'] and r['same_values']
    kernels = {k: v for k, v in r['specs'].items() if 'kernel' in k}
    assert sorted(kernels.values()) == ["('fsdp', None)", "(None, 'fsdp')"], r['specs']
    assert all(v == '()' for k, v in r['specs'].items() if 'bias' in k)
    assert sorted(s for k, s in r['shard_shapes'].items() if 'kernel' in k) == [[16, 16], [16, 32]]


def test_train_step_matches_single_device(worker):
    r = worker['train_step']
    ref = r['ref_losses']
    assert ref[-1] < ref[0]
    for fsdp in ('1', '2', '4'):
        assert r[fsdp]['losses'] == pytest.approx(ref, abs=1e-5), fsdp
        assert r[fsdp]['max_state_diff'] < 1e-5, fsdp
        assert r[fsdp]['b_spec'] == '()'
    assert r['1']['w_spec'] == '()'
    for fsdp in ('2', '4'):
        assert r[fsdp]['w_spec'] == r[fsdp]['mu_w_spec'] == "('fsdp', None)"


def test_global_batch(worker):
    g = worker['global_batch']
    assert g['image_shape'] == [8, 3, 4, 4] and g['label_shape'] == [8]
    assert g['is_batch_sharded'] and g['values_equal']
    assert g['n_shards'] == 4 and g['shard_shape'] == [2, 3, 4, 4]


def test_no_tensorflow_import(worker):
    assert not worker['imports_tensorflow']


def test_leaf_spec_and_single_device():
    """Rule and error paths that need no extra devices."""
    import jax
    from jax.sharding import PartitionSpec as P

    from var_jax import sharding as sh

    assert sh.leaf_spec((1024, 512), fsdp=1) == P()
    assert sh.leaf_spec((1024, 512), fsdp=8) == P('fsdp', None)
    assert sh.leaf_spec((512, 1024), fsdp=8) == P(None, 'fsdp')
    assert sh.leaf_spec((512, 512), fsdp=8) == P('fsdp', None)  # first on ties
    assert sh.leaf_spec((100, 3), fsdp=8, min_size=1) == P()
    assert sh.leaf_spec((8,), fsdp=8, min_size=16) == P()
    mesh = sh.make_mesh()
    assert dict(mesh.shape) == {'data': len(jax.devices()), 'fsdp': 1}
    with pytest.raises(ValueError, match='divisor'):
        sh.make_mesh(len(jax.devices()) + 1)


if __name__ == '__main__':
    _worker_main()
