"""var_jax.runtime: the malloc setting that keeps XLA:CPU temporaries mapped between calls."""

import os
import subprocess
import sys

import pytest

from var_jax import runtime

# Runs a jitted function with a few 4 MB temporaries a few times and prints the page faults of
# the last calls. With glibc's defaults every call faults its temporaries in again.
_CHILD = """
import resource, sys
from var_jax import runtime
applied = runtime.keep_freed_memory_on_cpu() if sys.argv[1] == '1' else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x + jnp.exp(x[::-1] @ x.T) @ x))
x = jnp.ones((1024, 1024)) * 1e-3
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x).block_until_ready()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(apply: bool):
    out = subprocess.run(
        [sys.executable, '-c', _CHILD, '1' if apply else '0'],
        capture_output=True,
        text=True,
        check=True,
        env={'JAX_PLATFORMS': 'cpu', 'PATH': ''},
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ).stdout.split()
    return out[0] == 'True', int(out[1])


def test_keep_freed_memory_stops_refaulting_temporaries():
    _, faults_default = _faults(False)
    if faults_default < 10_000:
        pytest.skip(f'this libc already keeps freed memory mapped ({faults_default} faults without the setting)')
    applied, faults = _faults(True)
    assert applied
    assert faults < faults_default / 10, (faults, faults_default)


@pytest.mark.parametrize('platforms, expected', [('cpu', False), ('cuda', True), ('tpu,cpu', True)])
def test_accelerator_detection_follows_jax_platforms(monkeypatch, platforms, expected):
    monkeypatch.setenv('JAX_PLATFORMS', platforms)
    assert runtime._accelerator_installed() is expected
    if expected:
        assert runtime.keep_freed_memory_on_cpu() is False  # leaves GPU / TPU hosts alone


_CACHE_CHILD = """
import sys
import jax, jax.numpy as jnp
from var_jax import runtime
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
print(runtime.use_compile_cache(sys.argv[1]))
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
"""


def _run_cache_child(directory, env_dir=None):
    env = {'JAX_PLATFORMS': 'cpu', 'PATH': ''} | ({'JAX_COMPILATION_CACHE_DIR': env_dir} if env_dir else {})
    return subprocess.run(
        [sys.executable, '-c', _CACHE_CHILD, directory],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    ).stdout.split()[-1]


def test_compile_cache_is_written_and_the_environment_wins(tmp_path):
    ours, theirs = tmp_path / 'ours', tmp_path / 'env'
    assert _run_cache_child(str(ours)) == 'True'
    assert ours.is_dir() and any(ours.iterdir())  # the compiled function was stored
    assert _run_cache_child(str(tmp_path / 'unused'), env_dir=str(theirs)) == 'False'
    assert not (tmp_path / 'unused').exists() and any(theirs.iterdir())
    assert _run_cache_child('') == 'False'
