"""What fit and trainers.run do with a non-finite loss, bad settings, a mismatched checkpoint and Ctrl-C."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from var_jax import trainers
from var_jax.trainers import loop

from train_runs import REPO, TIMEOUT_S, main_flags, restore_raw, run_env, small_config


# =============================================================================================
# Non-finite handling in fit (the step-level checks: tests/test_train_multidevice.py)
# =============================================================================================
def _toy_fit(tmp_path, total_steps, on_sample=None, nan_at=-1):
    """loop.fit on a one-matrix model (SGD on the synthetic images' mean), saving every 2 steps asynchronously,
    a sample grid every 4; the loss is NaN at step `nan_at`."""
    from configs.common import base_config
    from var_jax import sharding

    config = base_config()
    config.update(dict(seed=0, keep_checkpoints=5, save_every=2, log_every=2, sample_every=4))
    config.data.update(
        dict(data_dir=str(tmp_path / 'data'), image_size=8, synthetic_train_size=16, synthetic_test_size=4)
    )
    tx = optax.sgd(0.1)
    state = loop.new_state({'w': jnp.ones((2, 2))}, tx, 0)
    mesh = sharding.make_mesh(1, jax.devices()[:1])

    def step_fn(state, batch):
        def loss_fn(p):
            scale = jnp.where(state['step'] == nan_at, jnp.nan, jnp.mean(batch['image']) ** 2 + 1)
            return jnp.sum(p['w'] ** 2) * scale

        loss, grads = jax.value_and_grad(loss_fn)(state['params'])
        return loop.apply_update(state, grads, tx, loss, optax.tree.norm(grads)), dict(loss=loss)

    stage = loop.Stage('toy', step_fn, total_steps, 4, on_sample=on_sample)
    return loop.fit(
        stage, str(tmp_path), config, state=state, state_shardings=sharding.param_sharding(mesh, state), mesh=mesh
    )


def test_fit_raises_nonfinite_error_naming_last_good_checkpoint(tmp_path):
    """A NaN at step 3 (0-based 2) is caught at the next log/save boundary (4), before saving it."""
    from var_jax.checkpoint import Checkpointer

    with pytest.raises(loop.NonFiniteError) as e:
        _toy_fit(tmp_path, 8, nan_at=2)
    stage_dir = str(tmp_path / 'toy')
    assert 'step 2' in str(e.value) and stage_dir in str(e.value), str(e.value)
    with Checkpointer(stage_dir) as ckpt:
        assert ckpt.all_steps() == [2]  # step 4's state (flag raised) was not saved


# =============================================================================================
# Bad input
# =============================================================================================
def test_unknown_stage_is_rejected(tmp_path):
    config = small_config(str(tmp_path / 'data'), stages='tokenizer,transformr')
    with pytest.raises(ValueError, match='transformr'):
        trainers.run(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_image_size_must_match_the_tokenizer(tmp_path):
    config = small_config(str(tmp_path / 'data'), **{'data.image_size': 16})
    with pytest.raises(ValueError, match='image_size=8'):
        trainers.run(config, str(tmp_path))


def test_transformer_stage_without_tokenizer(tmp_path):
    config = small_config(str(tmp_path / 'data'), stages='transformer')
    with pytest.raises(FileNotFoundError) as e:
        trainers.run(config, str(tmp_path / 'work'))
    assert os.path.join(str(tmp_path / 'work'), 'tokenizer', 'export') in str(e.value)


@pytest.mark.parametrize('stages', ['tokenizer,transformer', 'transformer'])
def test_init_from_missing_directory(tmp_path, stages):
    missing = str(tmp_path / 'no_such_checkpoint')
    config = small_config(str(tmp_path / 'data'), stages=stages, init_from=missing)
    with pytest.raises(FileNotFoundError, match='no_such_checkpoint'):
        trainers.run(config, str(tmp_path / 'work'))


def test_incompatible_checkpoint_raises_config_mismatch(finished_run):
    """Run A's workdir holds transformer checkpoints of var.depth=2: resuming it with var.depth=1 must
    be refused with the differing field named, before anything is written. (The transformer stage:
    its model init compiles faster in this process than the tokenizer's; both stages share fit.)"""
    from var_jax.checkpoint import ConfigMismatchError

    workdir, data_dir = finished_run
    stage = os.path.join(workdir, 'transformer')
    listing = lambda: sorted(os.listdir(os.path.join(stage, 'checkpoints')))
    before = open(os.path.join(stage, 'config.json'), 'rb').read(), listing()
    config = small_config(data_dir, stages='transformer', **{'var.depth': 1})
    with pytest.raises(ConfigMismatchError) as e:
        trainers.run(config, workdir)
    msg = str(e.value)
    assert 'var.depth' in msg and 'checkpoint=2' in msg and 'now=1' in msg, msg
    assert 'stages' not in msg and 'var.embed_dim' not in msg, msg  # only what differs and matters
    assert (open(os.path.join(stage, 'config.json'), 'rb').read(), listing()) == before


def test_other_stage_settings_do_not_block_resume(finished_run):
    """The tokenizer's checkpoints ignore the transformer's settings: retuning the transformer in a
    workdir with a finished tokenizer finds the tokenizer done (nothing retrained, nothing written)
    instead of refusing; a tokenizer setting is still checked."""
    from var_jax.checkpoint import ConfigMismatchError

    workdir, data_dir = finished_run
    ckpts = os.path.join(workdir, 'tokenizer', 'checkpoints')
    listing = lambda: {d: os.path.getmtime(os.path.join(ckpts, d)) for d in os.listdir(ckpts)}
    before = listing()
    config = small_config(data_dir, stages='tokenizer', **{'transformer.optim.tblr': 0.123, 'var.depth': 1})
    trainers.run(config, workdir)
    assert listing() == before
    with pytest.raises(ConfigMismatchError, match='tokenizer.l1'):
        trainers.run(small_config(data_dir, stages='tokenizer', **{'tokenizer.l1': 0.5}), workdir)


@pytest.mark.slow
def test_ctrl_c_while_a_checkpoint_is_written_exits_cleanly(tmp_path, train_runs, finished_run):
    """Ctrl-C during an asynchronous save: one message, exit code 130, no traceback; what is on disk restores.
    (The tokenizer stage of run A's config, in a workdir of its own: it loads run A's executables and data.)"""
    from var_jax.checkpoint import Checkpointer

    work = str(tmp_path / 'work')
    flags = main_flags(work, finished_run[1], stages='tokenizer')
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, 'tests', 'train_worker.py'), 'main_interrupted', 'tokenizer', '8'] + flags,
        cwd=REPO,
        env=run_env(train_runs.cache_dir),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 130, out[-3000:]
    assert 'interrupted:' in proc.stderr and 'run the same command again to resume' in proc.stderr, out[-3000:]
    assert 'Traceback' not in out, out[-3000:]
    with Checkpointer(os.path.join(work, 'tokenizer')) as ckpt:  # also discards an unfinished save
        steps = ckpt.all_steps()
    assert steps and steps[0] == 4 and steps[-1] <= 8, steps  # step 8's save was in flight
    state = restore_raw(os.path.join(work, 'tokenizer', 'checkpoints', str(steps[-1]), 'state'))
    assert int(state['step']) == steps[-1]


def test_an_error_at_a_sample_grid_keeps_the_checkpoint_being_written(tmp_path, capsys):
    """The sample grid at step 4 fails right after step 4's asynchronous save started: fit lets the save finish
    before the error leaves it, so step 4 is complete on disk (not a tmp directory that the next start deletes),
    and the rerun resumes from it."""
    from var_jax.checkpoint import Checkpointer
    from var_jax.errors import ConfigError

    def failing_grid(params, step):
        raise ConfigError(f'a bad sample setting at step {step}')

    with pytest.raises(ConfigError, match='step 4'):
        _toy_fit(tmp_path, 8, on_sample=failing_grid)
    ckpts = tmp_path / 'toy' / 'checkpoints'
    assert not [d for d in os.listdir(ckpts) if 'tmp' in d], os.listdir(ckpts)
    with Checkpointer(str(tmp_path / 'toy')) as ckpt:
        assert ckpt.all_steps() == [2, 4]
    capsys.readouterr()
    final = _toy_fit(tmp_path, 8)
    assert 'resumed from step 4 of' in capsys.readouterr().out and int(final['step']) == 8
