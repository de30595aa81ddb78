"""Shared fixtures: the official golden outputs and the tiny models converted from them.

Also the session's XLA settings (inherited by the tests' subprocesses):
* LLVM at -O0: the tests' programs are tiny, so XLA:CPU spends nearly all their time compiling, most of it in
  LLVM's optimisation of hundreds of small fused kernels; -O0 roughly halves that (the notebook tests did it
  first). XLA's HLO passes and their fusion, layout and buffer decisions are untouched, and without fast-math
  no floating-point rewrites are allowed at any level.
* one persistent compilation cache per session (a fresh temporary directory, deleted at the end): a program
  that several tests compile again (each with its own jit of the same function) is loaded, not recompiled.

And the background lane (`background_jobs`): the slow subprocess runs of the selected modules (end-to-end
runs, multi-device workers) start with the session and run while the tests before them run here.
"""

import concurrent.futures
import os
import shutil
import tempfile

if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
_SESSION_CACHE = None
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):  # before anything imports jax, which reads it then
    _SESSION_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='var_jax_test_xla_cache_')

# The environment of the background jobs' subprocesses, taken now: tests that set variables with monkeypatch
# (even JAX_PLATFORMS) while a job starts a subprocess in its thread must not leak them into it.
ENVIRON = dict(os.environ)

from var_jax import runtime  # noqa: E402

runtime.keep_freed_memory_on_cpu()  # before JAX starts: faster CPU steps (see its docstring)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import train_runs  # noqa: E402  (its runs start from background_jobs below)
from train_runs import finished_run, resumed_runs, sharded, train_runs_fixture  # noqa: E402, F401

if _SESSION_CACHE and not jax.config.jax_compilation_cache_dir:  # jax was imported before this file
    jax.config.update('jax_compilation_cache_dir', _SESSION_CACHE)
# Parity with the official float32 outputs needs full-precision matmuls on every backend.
jax.config.update('jax_default_matmul_precision', 'highest')

DATA = os.path.join(os.path.dirname(__file__), 'data')
GOLDEN_PATCH_NUMS = (1, 2, 4, 8)


BACKGROUND_LANES = 1  # jobs at a time, next to this process's tests (2 CPU cores: one each)


def pytest_sessionfinish(session):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


class BackgroundJobs:
    """A first-in first-out lane of slow jobs (functions that start subprocesses and wait for them), the one
    place the test modules keep their jobs' futures (by name) and what several modules share (`shared`)."""

    def __init__(self, lanes=BACKGROUND_LANES):
        self._pool = concurrent.futures.ThreadPoolExecutor(lanes, thread_name_prefix='test_background')
        self._closers, self._futures, self.shared = [], {}, {}

    def submit(self, fn, *args, name=None) -> concurrent.futures.Future:
        future = self._pool.submit(fn, *args)
        if name is not None:
            self._futures[name] = future
        return future

    def result(self, name):
        """The result of the job submitted as `name` (waits for it; raises what it raised)."""
        assert name in self._futures, f'background job {name!r} was not started (see its start_background)'
        return self._futures[name].result()

    def on_close(self, fn):
        """fn() runs at the end of the session, before waiting for the lane (e.g. kills its subprocesses)."""
        self._closers.append(fn)

    def close(self):
        for fn in self._closers:
            fn()
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope='session', autouse=True)
def background_jobs(request, tmp_path_factory):
    """Before the first test, calls `start_background(jobs, items, tmp_path_factory, config)` of every selected
    module that defines it (items: its selected tests), and of tests/train_runs.py (items: every selected test
    that uses its fixtures) where the first such test is, in the order of the tests: the jobs the earlier modules
    need run first. The tests then wait for the results of their jobs."""
    jobs = BackgroundJobs()
    modules = {}
    for item in request.session.items:
        if getattr(item, 'module', None) is not None:
            modules.setdefault(item.module, []).append(item)
    train_runs_items = [i for i in request.session.items if set(i.fixturenames) & set(train_runs.FIXTURES)]
    try:
        for module, items in modules.items():
            if hasattr(module, 'start_background'):
                module.start_background(jobs, items, tmp_path_factory, request.config)
            if 'train_runs' not in jobs.shared and set(items) & set(train_runs_items):
                train_runs.start_background(jobs, train_runs_items, tmp_path_factory, request.config)
        yield jobs
    finally:
        jobs.close()


@pytest.fixture(scope='session')
def golden():
    """tests/data/tiny_public.npz: weights, inputs and outputs of the official code (see docs/testing.md)."""
    return dict(np.load(os.path.join(DATA, 'tiny_public.npz')))


def golden_state_dict(golden, prefix):
    return {k[len(prefix) :]: v for k, v in golden.items() if k.startswith(prefix)}


@pytest.fixture(scope='session')
def tiny(golden):
    """(vqvae, vae_params, var, var_params) converted from the golden official weights."""
    from var_jax import api

    return api.load_official(golden_state_dict(golden, 'vae/'), golden_state_dict(golden, 'var/'), GOLDEN_PATCH_NUMS)


def nchw(x):
    """Our NHWC maps in the official NCHW layout."""
    return np.asarray(x).transpose(0, 3, 1, 2)
