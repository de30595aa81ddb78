"""Kill and resume: main.py end to end, bitwise against the uninterrupted run (tests/train_runs.py)."""

import os
import signal

import jax
import pytest

from train_runs import (
    EXIT_PREEMPTED,
    PAUSE_AT,
    assert_bitwise_equal,
    log_tail,
    restore_raw,
)


# =============================================================================================
# Kill and resume: main.py end to end
# =============================================================================================
@pytest.mark.slow
def test_kill_and_resume_is_bitwise_identical(resumed_runs):
    from var_jax import checkpoint

    runs, stage = resumed_runs, resumed_runs.stage
    a, b = runs.workdirs['A'], runs.workdirs['B']
    b1_log, b2_log = (log_tail(os.path.join(runs.base, runs.log(r)), 10**7) for r in ('B1', 'B2'))
    assert f'[{stage}] step 4/12' in b1_log and f'[{stage}] step 8/12' not in b1_log
    if runs.signal == signal.SIGKILL:
        assert runs.b1_returncode == -signal.SIGKILL
        resumed_at = 4  # steps 5.. are redone from checkpoint 4
    else:  # SIGTERM during step PAUSE_AT's save: the run finishes the next step, saves it and exits cleanly
        resumed_at = PAUSE_AT + 1
        assert runs.b1_returncode == EXIT_PREEMPTED, b1_log[-3000:]
        assert f'preempted: saved step {resumed_at}' in b1_log and 'Traceback' not in b1_log, b1_log[-3000:]
    assert f'[{stage}] step 12/12' in b2_log and f'resumed from step {resumed_at} of' in b2_log
    if stage == 'transformer':
        assert 'resumed from step 12 of' in b2_log  # the finished tokenizer stage is not retrained
    for w in (a, b):
        for st in runs.stages:
            steps = sorted(int(s) for s in os.listdir(os.path.join(w, st, 'checkpoints')) if s.isdigit())
            assert steps[-1] == 12, (w, st, steps)
            assert not [s for s in os.listdir(os.path.join(w, st, 'checkpoints')) if 'tmp' in s]
    # Whole train states (params, AdamW moments, step, rng, data position; with the discriminator on,
    # its params and Adam state) and the exported models.
    for st in runs.stages:
        state_a = restore_raw(os.path.join(a, st, 'checkpoints', '12', 'state'))
        assert_bitwise_equal(state_a, restore_raw(os.path.join(b, st, 'checkpoints', '12', 'state')), f'{st} state')
    if 'tokenizer.disc_weight' in runs.overrides:
        adam_count = jax.tree.leaves(state_a['disc_opt_state'])[0]  # steps the discriminator trained
        assert int(adam_count) == 12 - runs.overrides['tokenizer.disc_start'], state_a['disc_opt_state']
    exports = ['tokenizer/export'] + (['export'] if 'transformer' in runs.stages else [])
    for export in exports:
        cfg_a, params_a = checkpoint.load_pretrained(os.path.join(a, export))
        cfg_b, params_b = checkpoint.load_pretrained(os.path.join(b, export))
        assert cfg_a == cfg_b and set(params_a) == ({'vae', 'var'} if export == 'export' else {'vae'})
        assert_bitwise_equal(params_a, params_b, export)
    # The end of the run (final sample grid of its last stage) was reached in both.
    grid = {'tokenizer': 'recon', 'transformer': 'samples'}[runs.stages[-1]]
    for w in (a, b):
        assert os.path.exists(os.path.join(w, runs.stages[-1], 'samples', f'{grid}_0000012.png'))
