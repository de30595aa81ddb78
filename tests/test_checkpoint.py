"""Tests for var_jax.checkpoint.

Cross-device restores use ONE subprocess with 4 simulated CPU devices (this
file run as a script): it writes an FSDP-sharded checkpoint that this 1-device
pytest process restores, and it restores a checkpoint this process wrote onto
an fsdp=4 mesh.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_POSITION = 2**40 + 3  # beyond int32: must survive without jax_enable_x64


def make_state(seed=0, sharding_fn=None):
    """Toy train state: MLP params, AdamW state after one update, step, rng, data position."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(nn.relu(nn.Dense(64)(x)))

    x = jnp.ones((4, 32))
    params = MLP().init(jax.random.PRNGKey(seed), x)['params']
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    state = {
        'params': params,
        'opt_state': opt_state,
        'step': jnp.asarray(123, jnp.int32),
        'rng': jax.random.PRNGKey(seed + 7),
        'data_position': DATA_POSITION,
    }
    if sharding_fn is not None:
        shardings = sharding_fn(state)
        state = {**state, **{k: jax.device_put(state[k], shardings[k]) for k in ('params', 'opt_state', 'step', 'rng')}}
    return state


def abstract_for(state, mesh, min_size):
    """Restore target on ``mesh``: sharded ShapeDtypeStructs, data_position on host."""
    import jax

    from var_jax import sharding as sh

    arrays = {k: v for k, v in state.items() if k != 'data_position'}
    target = sh.with_shardings(jax.eval_shape(lambda: arrays), sh.param_sharding(mesh, arrays, min_size=min_size))
    return {**target, 'data_position': 0}


def trees_equal(a, b):
    import jax

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
        return False
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb)
    )


# ----------------------------------------------------------------------------
# Worker (4-device subprocess)
# ----------------------------------------------------------------------------


def _worker_main(write_dir, read_dir):
    import jax

    from var_jax import sharding as sh
    from var_jax.checkpoint import Checkpointer

    mesh = sh.make_mesh(fsdp=4)
    # Write: params/moments of >= 512 elements are split over 4 devices.
    state = make_state(seed=1, sharding_fn=lambda s: sh.param_sharding(mesh, s, min_size=512))
    kernel = state['params']['Dense_0']['kernel']
    with Checkpointer(write_dir, max_to_keep=2, save_every=1000, config={'model': {'depth': 2}}) as ckpt:
        saved = ckpt.save(10, state, force=True)
    # Read: a checkpoint written by the 1-device pytest process, onto fsdp=4.
    ref = make_state(seed=2)
    with Checkpointer(read_dir, max_to_keep=2, save_every=1) as ckpt:
        restored = ckpt.restore(abstract_for(ref, mesh, min_size=512))
    r_kernel = restored['params']['Dense_0']['kernel']
    print(
        'RESULT '
        + json.dumps(
            {
                'n_devices': len(jax.devices()),
                'saved': bool(saved),
                'written_spec': str(tuple(kernel.sharding.spec)),
                'written_shard_shape': list(kernel.addressable_shards[0].data.shape),
                'restored_equal': trees_equal(restored, ref),
                'restored_spec': str(tuple(r_kernel.sharding.spec)),
                'restored_mu_spec': str(tuple(restored['opt_state'][0].mu['Dense_0']['kernel'].sharding.spec)),
                'restored_n_shards': len(r_kernel.addressable_shards),
                'imports_tensorflow': 'tensorflow' in sys.modules,
            }
        )
    )


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------


def start_background(jobs, items, tmp_path_factory, config):
    """tests/conftest.py (background_jobs) calls this before the session's first test: the worker runs on the
    session's background lane while the tests before this module run."""
    if any('cross_device' in item.fixturenames for item in items):
        jobs.submit(_run_cross_device, tmp_path_factory.mktemp('xdev'), name='cross_device')


@pytest.fixture(scope='module')
def cross_device(background_jobs):
    """The 4-device worker's run: (its JSON, dir it wrote)."""
    return background_jobs.result('cross_device')


def _run_cross_device(base):
    from var_jax.checkpoint import Checkpointer

    from conftest import ENVIRON  # (not at the top: this file is also the worker script)

    write_dir, read_dir = str(base / 'from_4_devices'), str(base / 'from_1_device')
    with Checkpointer(read_dir, max_to_keep=2, save_every=1) as ckpt:
        assert ckpt.save(5, make_state(seed=2))

    env = dict(ENVIRON)  # the session's, not what a test running meanwhile set
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
    env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONPATH'] = REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), write_dir, read_dir],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    assert proc.returncode == 0 and lines, f'worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    return json.loads(lines[-1][len('RESULT ') :]), write_dir


def test_restore_4_device_fsdp_checkpoint_on_1_device(cross_device):
    import jax

    from var_jax import sharding as sh
    from var_jax.checkpoint import Checkpointer

    info, write_dir = cross_device
    assert info['n_devices'] == 4 and info['saved']
    # Dense_0 is the outer Dense(8): kernel (64, 8), split along its 64 rows.
    assert info['written_spec'] == "('fsdp', None)" and info['written_shard_shape'] == [16, 8]
    assert not info['imports_tensorflow']

    expected = make_state(seed=1)
    with Checkpointer(write_dir, max_to_keep=2, save_every=1000) as ckpt:
        assert ckpt.latest_step() == 10
        restored = ckpt.restore(abstract_for(expected, sh.make_mesh(), min_size=512))
    assert trees_equal(restored, expected)
    assert len(jax.devices()) == 1
    assert restored['params']['Dense_0']['kernel'].sharding.num_devices == 1


def test_restore_1_device_checkpoint_on_fsdp_mesh(cross_device):
    info, _ = cross_device
    assert info['restored_equal']
    assert info['restored_spec'] == info['restored_mu_spec'] == "('fsdp', None)"
    assert info['restored_n_shards'] == 4


def test_roundtrip_bitwise(tmp_path):
    import jax

    from var_jax import sharding as sh
    from var_jax.checkpoint import Checkpointer

    state = make_state(seed=3)
    with Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ckpt:
        assert ckpt.save(123, state)
        assert ckpt.latest_step() == 123  # visible while the async write runs
        restored = ckpt.restore(abstract_for(state, sh.make_mesh(), min_size=2**18))
    assert trees_equal(restored, state)
    assert restored['data_position'] == DATA_POSITION and isinstance(restored['data_position'], int)
    assert restored['rng'].dtype == np.uint32
    # Restoring into existing arrays (their shardings are reused) works too.
    with Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ckpt:
        again = ckpt.restore({**jax.tree.map(lambda x: x, state), 'data_position': 0}, step=123)
    assert trees_equal(again, state)


def test_keep_k_and_save_interval(tmp_path):
    from var_jax.checkpoint import Checkpointer

    state = make_state()
    with Checkpointer(tmp_path, max_to_keep=2, save_every=2) as ckpt:
        assert ckpt.latest_step() is None
        saved = [s for s in range(1, 10) if ckpt.save(s, state)]
        assert saved == [2, 4, 6, 8]  # the first step seen (1) is not saved either
        ckpt.wait()
        assert ckpt.all_steps() == [6, 8] and ckpt.latest_step() == 8
        assert ckpt.save(9, state, force=True)  # final save off the interval
        assert not ckpt.save(9, state, force=True)  # already there: no-op
        ckpt.wait()
        assert ckpt.all_steps() == [8, 9]
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['8', '9']
    with Checkpointer(tmp_path, max_to_keep=2, save_every=2) as ckpt:
        assert ckpt.latest_step() == 9


def test_interrupted_save_is_not_latest(tmp_path):
    from var_jax.checkpoint import Checkpointer

    state = make_state()
    with Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ckpt:
        ckpt.save(4, state)
    # What a save killed mid-write leaves behind: a tmp dir, never renamed.
    tmp = tmp_path / 'checkpoints' / '8.orbax-checkpoint-tmp-1700000000000000'
    (tmp / 'state').mkdir(parents=True)
    (tmp / 'state' / 'partial').write_bytes(b'\0' * 10)
    with Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ckpt:
        assert ckpt.latest_step() == 4 and ckpt.all_steps() == [4]
        assert ckpt.save(5, state)
        ckpt.wait()
        assert ckpt.latest_step() == 5
    assert not tmp.exists()  # cleaned up at start-up


def test_incompatible_config_is_refused(tmp_path):
    import ml_collections

    from var_jax.checkpoint import Checkpointer, ConfigMismatchError

    def config(depth=16, total_steps=100, lr=1e-4):
        return ml_collections.ConfigDict(
            {'model': {'depth': depth, 'patch_nums': (1, 2, 3)}, 'train': {'total_steps': total_steps, 'lr': lr}}
        )

    state = make_state()
    with Checkpointer(tmp_path, max_to_keep=2, save_every=1, config=config()) as ckpt:
        ckpt.save(1, state)
    config_file = tmp_path / 'config.json'
    before = config_file.read_text()
    assert json.loads(before)['model']['depth'] == 16

    resumable = ('*total_steps',)
    with pytest.raises(ConfigMismatchError) as err:
        Checkpointer(
            tmp_path,
            max_to_keep=2,
            save_every=1,
            config=config(depth=20, total_steps=500, lr=3e-4),
            resumable_keys=resumable,
        )
    msg = str(err.value)
    assert 'model.depth' in msg and 'train.lr' in msg and 'total_steps' not in msg
    # The way out is on the command line: the checkpoint's values as flags, or a new workdir.
    assert '--config.model.depth=16 --config.train.lr=0.0001' in msg and 'new --workdir' in msg, msg
    assert config_file.read_text() == before  # nothing overwritten
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']

    # Fields listed as resumable may change; compare_keys restricts the check.
    with Checkpointer(
        tmp_path, max_to_keep=2, save_every=1, config=config(total_steps=500), resumable_keys=resumable
    ) as ckpt:
        assert ckpt.saved_config()['train']['total_steps'] == 100
    assert json.loads(config_file.read_text())['train']['total_steps'] == 500
    Checkpointer(tmp_path, max_to_keep=2, save_every=1, config=config(lr=3e-4), compare_keys=('model',)).close()

    # A field the saved config lacks (added to the project later) does not block the resume; a saved one
    # the current config lacks does.
    newer = config(total_steps=500)
    newer.model.new_field = 'anything'
    Checkpointer(tmp_path, max_to_keep=2, save_every=1, config=newer, resumable_keys=resumable).close()
    older = config(total_steps=500)
    del older.model['depth']
    with pytest.raises(ConfigMismatchError, match='model.depth'):
        Checkpointer(tmp_path, max_to_keep=2, save_every=1, config=older, resumable_keys=resumable)


@pytest.mark.parametrize('damage', ['truncated_arrays', 'missing_metadata', 'empty_step'])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    """A newest step the disk or a copy left incomplete is set aside (kept, named in one warning) and the run
    resumes from the newest intact step."""
    from var_jax import sharding as sh
    from var_jax.checkpoint import Checkpointer

    old, new = make_state(seed=1), make_state(seed=2)
    with Checkpointer(tmp_path, save_every=1, config={'model': 1}) as ckpt:
        ckpt.save(1, old)
        ckpt.save(2, new)
    step_dir = tmp_path / 'checkpoints' / '2'
    if damage == 'truncated_arrays':
        files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and '/d/' in str(p)]
        assert files
        for p in files:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    elif damage == 'missing_metadata':
        (step_dir / 'state' / '_METADATA').unlink()
    else:
        for p in sorted(step_dir.rglob('*'), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
    caplog.set_level('WARNING')
    with Checkpointer(tmp_path, save_every=1, config={'model': 1}) as ckpt:
        restored, step = ckpt.restore_latest(abstract_for(old, sh.make_mesh(), min_size=2**18))
        assert step == 1 and trees_equal(restored, old)
        assert ckpt.all_steps() == [1]
    assert (tmp_path / 'damaged_checkpoints' / '2').is_dir()  # kept aside, not deleted
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith('checkpoint step')]
    assert len(warnings) == 1 and 'step 2' in warnings[0] and 'damaged_checkpoints' in warnings[0], warnings


def test_sigterm_sets_flag_and_restores_handler(tmp_path):
    from var_jax.checkpoint import Checkpointer

    def previous(signum, frame):
        raise AssertionError('previous handler must not run inside the context')

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with Checkpointer(tmp_path, max_to_keep=1, save_every=100) as ckpt:
            with ckpt.handle_preemption():
                assert not ckpt.should_stop(1)
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(200):  # Python runs the handler on the main thread, maybe a bit later
                    if ckpt.preempted:
                        break
                    time.sleep(0.005)
                assert ckpt.preempted and ckpt.should_stop(2)
                assert ckpt.save(2, make_state(), force=True)
            assert signal.getsignal(signal.SIGTERM) is previous
            assert ckpt.latest_step() == 2
    finally:
        signal.signal(signal.SIGTERM, old)


def test_typed_keys_and_missing_checkpoint(tmp_path):
    import jax

    from var_jax.checkpoint import Checkpointer

    with Checkpointer(tmp_path, max_to_keep=1, save_every=1) as ckpt:
        with pytest.raises(TypeError, match='key_data'):
            ckpt.save(1, {'rng': jax.random.key(0)})
        with pytest.raises(FileNotFoundError):
            ckpt.restore({'x': np.zeros(3)})


if __name__ == '__main__':
    _worker_main(sys.argv[1], sys.argv[2])


def _fill_the_disk(ckpt, state):
    """Saves `state` as step 2 after step 1 of a small one; returns the error the save (or its wait) raised."""
    import pytest

    from var_jax.errors import DiskFullError

    with pytest.raises(DiskFullError) as e:
        ckpt.save(2, state)
        ckpt.wait()
    return str(e.value)


def test_full_disk_is_one_message_and_keeps_the_previous_checkpoint(tmp_path):
    """A real full disk (a 1 MiB tmpfs; needs the right to mount, e.g. root in a container): the save of a
    checkpoint that does not fit fails with one DiskFullError naming the directory and the size, leaves no
    partial step behind, and step 1 restores."""
    import subprocess

    import jax
    import jax.numpy as jnp
    import pytest

    from var_jax.checkpoint import Checkpointer

    disk = tmp_path / 'disk'
    disk.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(disk)], capture_output=True).returncode:
        pytest.skip('cannot mount a small tmpfs here (not root); test_full_disk_simulated covers the translation')
    try:
        small = {'w': jnp.ones((100,)), 'step': jnp.asarray(1)}
        big = {'w': jnp.ones((100,)), 'step': jnp.asarray(2), 'x': jax.random.normal(jax.random.PRNGKey(0), (600_000,))}
        with Checkpointer(disk, max_to_keep=3, save_every=1) as ckpt:
            ckpt.save(1, small)
            ckpt.wait()
            msg = _fill_the_disk(ckpt, big)
        assert msg.startswith('no space left on the disk of ' + str(disk / 'checkpoints')) and '2.3 MiB' in msg, msg
        assert os.listdir(disk / 'checkpoints') == ['1']
        with Checkpointer(disk, max_to_keep=3, save_every=1) as ckpt:
            assert ckpt.all_steps() == [1] and int(ckpt.restore(small)['step']) == 1
    finally:
        subprocess.run(['umount', str(disk)])


def test_full_disk_simulated(tmp_path, monkeypatch):
    """The same translation where no tmpfs can be mounted: tensorstore's ENOSPC text, raised by the save."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from var_jax.checkpoint import Checkpointer

    state = {'w': jnp.ones((100,)), 'step': jnp.asarray(1)}
    with Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ckpt:
        ckpt.save(1, state)
        ckpt.wait()

        def full(*args, **kwargs):
            raise ValueError(
                "RESOURCE_EXHAUSTED: Failed to write 400 bytes: No space left on device [os_error_code='28']"
            )

        monkeypatch.setattr(ocp.CheckpointManager, 'save', full)
        msg = _fill_the_disk(ckpt, state)
    assert str(tmp_path / 'checkpoints') in msg and 'MiB' in msg and 'run the same command again' in msg, msg
    monkeypatch.undo()
    with Checkpointer(tmp_path, max_to_keep=3, save_every=1) as ckpt:
        assert ckpt.all_steps() == [1] and int(ckpt.restore(state)['step']) == 1
