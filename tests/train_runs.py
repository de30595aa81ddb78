"""The training runs that several test modules share, as subprocesses on the session's background lane.

tests/conftest.py starts them (start_background) before the first test that needs one, and they run while the
tests before it run:

* tests/train_worker.py `sharded` (4 simulated CPU devices): transformer.make_step on 1 device, 4-way data
  parallel and FSDP 2 / 4, the non-finite guard, a progressive stage's truncated step against the masked
  full one, and a 4-device checkpoint for a 1-device restore (tests/test_train_multidevice.py).
* the kill-and-resume chains: `main.py` run A to the end; run B in another workdir paused right
  after a checkpoint, SIGKILLed (or SIGTERMed), then the same main.py command again to completion.
  Three variants (RESUME_RUNS): both stages killed in the transformer stage; a tokenizer-only run with
  the discriminator on, killed in the tokenizer stage; the same tokenizer run preempted by SIGTERM there
  (tests/test_train_resume.py). One run A per config; tests/test_train_errors.py uses the full run's A.

Only the jobs that the selected tests need are started. The subprocesses share a persistent JAX
compilation cache (in pytest's cache dir), so run B reuses run A's executables: the comparison of
A and B then isolates what resume restores (state, data position, rng) from compilation. The Ctrl-C
test's main.py (the tokenizer of run A, interrupted) runs after run A and loads its executables too.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import ENVIRON

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900

# A tiny configs/var_small.py run: 8 px images, 3 scales, 12 steps per stage.
TINY = {
    'data.image_size': 8,
    'data.synthetic_train_size': 64,
    'data.synthetic_test_size': 16,
    'vae.ch': 32,
    'vae.ch_mult': (1, 2),
    'vae.num_res_blocks': 1,
    'vae.vocab_size': 64,
    'vae.z_channels': 8,
    'vae.patch_nums': (1, 2, 4),
    'var.depth': 2,
    'var.embed_dim': 64,
    'var.num_heads': 2,
    'var.drop_path_rate': 0.1,
    'tokenizer.total_steps': 12,
    'tokenizer.batch_size': 8,
    'tokenizer.optim.warmup_steps': 2,
    'transformer.total_steps': 12,
    'transformer.batch_size': 8,
    'transformer.optim.warmup_steps': 2,
    'save_every': 4,
    'log_every': 4,
    'sample_every': 1000,
    'eval.val_batches': 1,
    'sample.num_images': 4,
    'sample.ncols': 4,
    'sample.batch_size': 4,
}
PAUSE_AT = 6  # run B is killed after step 6 of a stage: checkpoint 4 is on disk, steps 5-6 are lost
# Kill-and-resume variants: the stage whose step PAUSE_AT the kill lands after, config overrides on TINY.
# (Their names are in the workdir paths, which error messages quote: no config field names.)
# The signal is SIGKILL (steps after checkpoint 4 are lost) or SIGTERM (a preemption notice: the run saves
# after the step that is running and exits with code 75). Variants with the same overrides share run A.
# The discriminator trains from step 3 (disc_start 2), so its params and Adam state at the checkpoint
# a resume starts from (4, or 7 after SIGTERM) are not the initial ones.
GAN_TOKENIZER = {
    'stages': 'tokenizer',
    'tokenizer.disc_weight': 0.5,
    'tokenizer.disc_start': 2,
    'tokenizer.disc_layers': 1,
    'tokenizer.disc_ndf': 8,
}
RESUME_RUNS = {
    'full_run': ('transformer', {}, signal.SIGKILL),  # both stages
    'gan_tokenizer': ('tokenizer', GAN_TOKENIZER, signal.SIGKILL),
    'preempted_tokenizer': ('tokenizer', GAN_TOKENIZER, signal.SIGTERM),
}
EXIT_PREEMPTED = 75  # main.py's exit code for a clean, resumable stop on SIGTERM


def _cli(value):
    return '(' + ','.join(map(str, value)) + ')' if isinstance(value, tuple) else str(value)


def main_flags(workdir, data_dir, **extra):
    overrides = dict(TINY, **{'data.data_dir': data_dir}, **extra)
    return ['--config=configs/var_small.py', f'--workdir={workdir}'] + [
        f'--config.{k}={_cli(v)}' for k, v in overrides.items()
    ]


def small_config(data_dir, **extra):
    """configs/var_small.py with the TINY overrides (as main.py's flags would set them)."""
    from configs import var_small

    config = var_small.get_config()
    for key, value in dict(TINY, **{'data.data_dir': data_dir}, **extra).items():
        *parents, leaf = key.split('.')
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def run_env(cache_dir, devices=None):
    env = dict(
        ENVIRON,
        JAX_PLATFORMS='cpu',
        TF_CPP_MIN_LOG_LEVEL='3',
        PYTHONPATH=REPO + os.pathsep + ENVIRON.get('PYTHONPATH', ''),
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        JAX_COMPILATION_CACHE_MAX_SIZE=str(2**28),
    )
    if devices:
        env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}').strip()
    return env


def log_tail(path, n=6000):
    try:
        with open(path, errors='replace') as f:
            return f.read()[-n:]
    except OSError:
        return '<no log>'


class _Proc:
    """A subprocess of ours with its output in a log file."""

    def __init__(self, args, log, env):
        self.log = log
        with open(log, 'w') as f:
            self.p = subprocess.Popen(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)

    def wait(self, timeout=TIMEOUT_S):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f'{self.log}: timed out after {timeout} s\n{log_tail(self.log)}')

    def check(self):
        rc = self.wait()
        assert rc == 0, f'{self.log}: exit code {rc}\n{log_tail(self.log)}'

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()  # SIGKILL, by our own handle
            self.p.wait()


class _Background:
    """The module's subprocesses: started once, waited on by the tests that need them."""

    def __init__(self, base, cache_dir):
        self.base, self.cache_dir = base, cache_dir
        self.procs, self.sharded_future, self.runs = [], None, {}
        self.lock, self.closing = threading.Lock(), False

    def _start(self, args, log, env):
        with self.lock:  # close() kills every process started before it, and no later one starts
            assert not self.closing, 'tests are over'
            proc = _Proc(args, os.path.join(self.base, log), env)
            self.procs.append(proc)
            return proc

    def run_sharded(self):
        """The `sharded` worker (a background job): (its result.json, its output directory)."""
        out = os.path.join(self.base, 'sharded')
        os.makedirs(out)
        self._start(
            [sys.executable, os.path.join(REPO, 'tests', 'train_worker.py'), 'sharded', out],
            'sharded.log',
            run_env(self.cache_dir, devices=4),
        ).check()
        with open(os.path.join(out, 'result.json')) as f:
            return json.load(f), out

    # -- kill and resume -------------------------------------------------------------------------
    def start_resume_chain(self, variants, jobs):
        """variants: {RESUME_RUNS name: also run B}. The variants of one config run one after another in
        one background job (its first run A serves them all); the configs' jobs run in lane order, all but
        the first once the first run A has generated the synthetic dataset they all read."""
        self.data_dir = os.path.join(self.base, 'data')
        self.data_ready = threading.Event()
        self.runs, groups = {}, {}
        for v in RESUME_RUNS:
            if v in variants:
                group = groups.setdefault(json.dumps(RESUME_RUNS[v][1], sort_keys=True), [])
                self.runs[v] = _ResumeRuns(self.base, v, a_owner=self.runs[group[0]] if group else None)
                group.append(v)

        def chain(names, makes_data):
            if not makes_data:
                self.data_ready.wait(TIMEOUT_S)
            for v in names:
                self._chain(self.runs[v], with_b=variants[v], makes_data=makes_data)

        for i, names in enumerate(groups.values()):
            jobs.submit(chain, names, i == 0)

    def _main(self, runs, name, *, paused=False):
        """Run `name` (A, B1 or B2) of `runs` in its workdir (A or B)."""
        flags = main_flags(runs.workdirs[name[0]], self.data_dir, **runs.overrides)
        args = (
            [os.path.join(REPO, 'tests', 'train_worker.py'), 'main_paused', runs.stage, str(PAUSE_AT)]
            if paused
            else [os.path.join(REPO, 'main.py')]
        )
        return self._start([sys.executable] + args + flags, runs.log(name), run_env(self.cache_dir))

    def _chain(self, runs, with_b, makes_data):
        try:
            if runs.a_owner is None:
                a = self._main(runs, 'A')
                while makes_data and a.p.poll() is None and 'step 0/' not in log_tail(a.log, 10**7):
                    time.sleep(0.2)  # fit prints its first step once the data is there
                self.data_ready.set()
                a.check()
            else:  # run A of the same config, earlier in this chain
                assert runs.a_owner.a_done.is_set() and runs.a_owner.a_error is None, (
                    f'run A of {runs.a_owner.variant} failed: {runs.a_owner.a_error}'
                )
            runs.a_done.set()
            if not with_b:
                return
            b1 = self._main(runs, 'B1', paused=True)
            marker = os.path.join(runs.workdirs['B'], runs.stage, 'checkpoints', '4', 'commit_success.txt')
            deadline = time.time() + TIMEOUT_S
            while not (os.path.exists(marker) and f'PAUSED at step {PAUSE_AT}' in log_tail(b1.log, 10**7)):
                assert b1.p.poll() is None, f'run B exited before the kill:\n{log_tail(b1.log)}'
                assert time.time() < deadline, f'run B never paused:\n{log_tail(b1.log)}'
                time.sleep(0.1)
            if runs.signal == signal.SIGKILL:
                b1.kill()
            else:
                b1.p.send_signal(runs.signal)
                b1.wait()
            runs.b1_returncode = b1.p.returncode
            self._main(runs, 'B2').check()
        except BaseException as e:  # reported by the tests that wait on the chain
            runs.error = e
            if not runs.a_done.is_set():
                runs.a_error = e
        finally:
            self.data_ready.set()
            runs.a_done.set()
            runs.b_done.set()

    def wait(self, runs, event):
        assert event.wait(2 * TIMEOUT_S * len(self.runs)), 'background runs timed out'
        if runs.error is not None and (
            event is runs.b_done or not os.path.isdir(os.path.join(runs.workdirs['A'], 'export'))
        ):
            raise AssertionError(f'background runs {runs.variant} failed: {runs.error}')

    def close(self):
        with self.lock:
            self.closing = True
        for proc in self.procs:
            proc.kill()


class _ResumeRuns:
    """One RESUME_RUNS variant: workdirs A and B (B1 killed, B2 resumed), logs, completion events."""

    def __init__(self, base, variant, a_owner=None):
        self.variant, self.base, self.a_owner = variant, base, a_owner
        self.stage, self.overrides, self.signal = RESUME_RUNS[variant]
        self.stages = self.overrides.get('stages', 'tokenizer,transformer').split(',')  # var_small's default
        self.workdirs = {name: os.path.join(base, f'{variant}_{name}') for name in ('A', 'B')}
        if a_owner is not None:  # the same config: one run A
            self.workdirs['A'] = a_owner.workdirs['A']
        self.a_done, self.b_done = threading.Event(), threading.Event()
        self.error = self.a_error = self.b1_returncode = None

    def log(self, run):
        return f'{self.variant}_{run}.log'


def _resume_variants(items):
    """{RESUME_RUNS variant: whether its run B is needed} for the selected tests."""
    wanted = {}
    for item in items:
        if 'resumed_runs' in item.fixturenames:
            wanted[item.callspec.params['resumed_runs']] = True
        elif 'finished_run' in item.fixturenames:
            wanted.setdefault('full_run', False)
    return wanted


FIXTURES = ('sharded', 'finished_run', 'resumed_runs')  # what the runs serve; conftest starts them on demand


def start_background(jobs, items, tmp_path_factory, config):
    """conftest's background_jobs calls this before the first test that needs a run (items: every selected test
    that does): the subprocesses run on its background lane while the tests before them run."""
    try:
        cache_dir = str(config.cache.mkdir('var_jax_test_train_jax_cache'))
    except AttributeError:  # -p no:cacheprovider
        cache_dir = str(tmp_path_factory.mktemp('jax_cache'))
    background = jobs.shared['train_runs'] = _Background(str(tmp_path_factory.mktemp('train')), cache_dir)
    jobs.on_close(background.close)
    needs = {name for item in items for name in item.fixturenames}
    if 'sharded' in needs:
        background.sharded_future = jobs.submit(background.run_sharded)
    if needs & {'finished_run', 'resumed_runs'}:
        background.start_resume_chain(_resume_variants(items), jobs)


@pytest.fixture(scope='session', name='train_runs')
def train_runs_fixture(background_jobs):
    assert 'train_runs' in background_jobs.shared, 'tests/conftest.py (background_jobs) starts the runs'
    return background_jobs.shared['train_runs']


@pytest.fixture(scope='session')
def sharded(train_runs):
    return train_runs.sharded_future.result()


@pytest.fixture(scope='session')
def finished_run(train_runs):
    """Workdir of run A (both stages to the end), and the data dir it generated."""
    runs = train_runs.runs['full_run']
    train_runs.wait(runs, runs.a_done)
    return runs.workdirs['A'], train_runs.data_dir


@pytest.fixture(scope='session', params=list(RESUME_RUNS))
def resumed_runs(request, train_runs):
    """A RESUME_RUNS variant's runs A and B, both finished."""
    runs = train_runs.runs[request.param]
    train_runs.wait(runs, runs.b_done)
    return runs


def restore_raw(path):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return jax.device_get(ckptr.restore(path))


def assert_bitwise_equal(a, b, what):
    fa = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(a)}
    fb = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(b)}
    assert fa.keys() == fb.keys(), what
    diffs = {k: float(np.max(np.abs(fa[k].astype(np.float64) - fb[k]))) for k in fa if not np.array_equal(fa[k], fb[k])}
    assert not diffs, f'{what}: not bitwise equal, max |diff| per leaf: {diffs}'
