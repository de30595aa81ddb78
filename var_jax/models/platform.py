"""Which platform a traced program is for: the attention kernels, the block scan, the KV-cache layout and the
sampler's token draws all choose by it.

It is `jax.default_backend()`, unless `compile_target(platform)` says otherwise: compiling ahead of time for
a TPU on a CPU host (benchmarks/aot.py) traces on the CPU backend for the TPU.
"""

import contextlib
from typing import Optional

import jax

_TARGET = [None]  # platform set by compile_target, else None (the default backend)


@contextlib.contextmanager
def compile_target(platform: Optional[str]):
    """Within the block, programs are traced for `platform` ('tpu', 'gpu', 'cpu') instead of the default
    backend; for ahead-of-time compilation on another host."""
    old, _TARGET[0] = _TARGET[0], platform
    try:
        yield
    finally:
        _TARGET[0] = old


def target_platform() -> str:
    """'tpu', 'gpu' or 'cpu': the platform the traced program is for."""
    p = _TARGET[0] or jax.default_backend()
    return 'gpu' if p in ('cuda', 'rocm') else p
