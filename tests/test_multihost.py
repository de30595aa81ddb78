"""Several JAX processes as one run, executed: `python -m var_jax.launch` starts 2 processes of main.py with 2 CPU
devices each (real cross-process collectives, gloo), against 1 process with 4 devices and the same global batch.
Both runs go on the session's background lane (tests/conftest.py); they share one compilation cache."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train_runs import REPO, TIMEOUT_S, log_tail, main_flags, run_env

pytestmark = pytest.mark.multiprocess
RUN = {'eval.val_batches': 0, 'transformer.total_steps': 8, 'tokenizer.total_steps': 8}  # the rest: train_runs.TINY


def start_background(jobs, items, tmp_path_factory, config):
    names = {item.name for item in items}
    base = tmp_path_factory.mktemp('multihost')
    if names & {'test_two_processes_train_as_one_with_four_devices', 'test_two_processes_write_each_file_once'}:
        jobs.submit(_equality_runs, str(base), name='multihost_runs')
    if 'test_a_killed_process_stops_the_others_in_bounded_time' in names:
        jobs.submit(_kill_run, str(base), name='multihost_kill')


def _run(args, log, env, timeout=TIMEOUT_S):
    with open(log, 'w') as f:
        rc = subprocess.run(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    return rc, log_tail(log, 10**7)


def _equality_runs(base):
    cache = os.path.join(base, 'cache')
    data, one, two = (os.path.join(base, d) for d in ('data', 'one', 'two'))
    single = _run(
        [sys.executable, 'main.py', *main_flags(one, data, **RUN)],
        os.path.join(base, 'one.log'),
        run_env(cache, devices=4),
    )
    launched = _run(
        [
            sys.executable,
            '-m',
            'var_jax.launch',
            '--num_processes',
            '2',
            '--devices_per_process',
            '2',
            '--',
            'main.py',
            *main_flags(two, data, **RUN),
        ],
        os.path.join(base, 'two.log'),
        run_env(cache),
    )
    return dict(one=one, two=two, single=single, launched=launched)


def _losses(log):
    return {m.group(1, 2): float(m.group(3)) for m in re.finditer(r'\[(\w+)\] step (\d+)/\d+ loss ([\d.]+)', log)}


def _flat(export):
    import jax

    from var_jax import checkpoint

    params = checkpoint.load_pretrained(export)[1]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def test_two_processes_train_as_one_with_four_devices(background_jobs):
    """The same global batches (a split in memory is cut per global batch, for any host count), so the same losses;
    the exports agree to the summation order of the cross-process gradient all-reduce (gloo sums in another
    order than XLA's in-process all-reduce): the tokenizer's biases before a GroupNorm, whose gradient is ~0,
    move by AdamW's normalised noise (< 1e-3), everything else by float32 rounding."""
    r = background_jobs.result('multihost_runs')
    for name in ('single', 'launched'):
        assert r[name][0] == 0, (name, r[name][1][-3000:])
    one, two = _losses(r['single'][1]), _losses(r['launched'][1])
    assert len(one) == 4 and one.keys() == two.keys(), (one, two)
    for k in one:
        assert abs(one[k] - two[k]) <= 2e-4 * abs(one[k]), (k, one[k], two[k])  # the 4 printed digits agree
    a, b = _flat(os.path.join(r['one'], 'export')), _flat(os.path.join(r['two'], 'export'))
    assert a.keys() == b.keys() and len(a) > 50
    diff = {k: float(np.abs(a[k] - b[k]).max()) for k in a}
    assert max(v for k, v in diff.items() if k.startswith("['var']")) < 1e-6, diff
    assert max(diff.values()) < 2e-3, max(diff.items(), key=lambda kv: kv[1])


def test_two_processes_write_each_file_once(background_jobs):
    """One progress line per step (process 0's), one export, one TensorBoard directory per stage."""
    r = background_jobs.result('multihost_runs')
    log = r['launched'][1]
    assert log.count('[transformer] step 8/8') == 1 and 'on 2 hosts' in log, log[-3000:]
    assert not re.search(r'^\[process 1\] .*step \d+/', log, re.M)  # process 1's stdout is silent
    assert json.load(open(os.path.join(r['two'], 'export', 'model.json'))).keys() == {'vae', 'var'}
    for stage in ('tokenizer', 'transformer'):
        assert len(os.listdir(os.path.join(r['two'], stage, 'tb'))) == 1, stage


def _kill_run(base):
    """2 processes started directly (their pids known); process 1 SIGKILLed once training runs: how long process 0
    takes to exit, its code and output."""
    from var_jax import launch

    port = launch.free_port()
    work, data = os.path.join(base, 'kill'), os.path.join(base, 'kill_data')
    flags = main_flags(
        work,
        data,
        **dict(RUN, **{'tokenizer.total_steps': 10_000, 'stages': 'tokenizer', 'cluster.heartbeat_timeout_s': 5}),
    )
    logs = [os.path.join(base, f'kill_{i}.log') for i in range(2)]
    procs = [
        subprocess.Popen(
            launch.process_args(['main.py', *flags], i, 2, port),
            cwd=REPO,
            env=run_env(os.path.join(base, 'cache'), 2),
            stdout=open(log, 'w'),
            stderr=subprocess.STDOUT,
        )
        for i, log in enumerate(logs)
    ]
    try:
        deadline = time.time() + TIMEOUT_S
        while 'compiled and ran the first step' not in log_tail(logs[0], 10**7):
            assert time.time() < deadline and procs[0].poll() is None, log_tail(logs[0])
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        rc = procs[0].wait(120)
        return dict(rc=rc, seconds=time.time() - t0, log=log_tail(logs[0], 10**7))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_a_killed_process_stops_the_others_in_bounded_time(background_jobs):
    """kill -9 of one process: the other does not hang; it exits non-zero within about the heartbeat timeout
    (cluster.heartbeat_timeout_s = 5 here) with JAX's message naming the lost task, or after a collective's
    30 s timeout when the kill lands in one."""
    r = background_jobs.result('multihost_kill')
    assert r['rc'] != 0 and r['seconds'] < 60, (r['rc'], r['seconds'], r['log'][-3000:])
    # JAX's heartbeat check names the lost task; a collective that waited on it times out instead (30 s).
    assert re.search(r'tasks are unhealthy \(stopped sending heartbeats\)|DEADLINE_EXCEEDED', r['log']), r['log'][
        -3000:
    ]
    print(f'process 0 exited with {r["rc"]} {r["seconds"]:.1f} s after process 1 was killed')
