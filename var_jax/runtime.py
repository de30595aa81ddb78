"""Process setup: the CPU allocator (before JAX starts its thread pool), several processes as one JAX program, and
the compilation cache."""

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _accelerator_installed() -> bool:
    """True if JAX will find a GPU / TPU backend (a PJRT plugin or libtpu is installed)."""
    platforms = os.environ.get('JAX_PLATFORMS', '')
    if platforms:
        return platforms.split(',')[0].strip() not in ('cpu', '')
    if importlib.util.find_spec('libtpu') or importlib.metadata.entry_points(group='jax_plugins'):
        return True
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def keep_freed_memory_on_cpu() -> bool:
    """On a CPU-only Linux host, stops glibc malloc from returning freed memory to the OS.

    Why: XLA:CPU allocates each step's temporaries afresh. With glibc's defaults the big ones
    come from mmap or from per-thread arenas that are trimmed after the step, so every step
    page-faults its whole working set back in, a visible share of a CPU train step's time
    (benchmarks/train.py). One arena, no mmap and no
    trimming keep that memory mapped between steps; the cost is that the process keeps its peak
    heap. Must run before JAX first touches a device (the pool threads pick their arena then);
    later it changes nothing. Not applied when a GPU / TPU backend is installed: there host
    allocation is not the bottleneck and tf.data's many threads would share one arena lock.
    Returns whether the setting was applied.
    """
    if _accelerator_installed():
        return False
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return False
    return all(
        libc.mallopt(param, value) == 1
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    )


def use_compile_cache(directory: str) -> bool:
    """Turns on XLA's persistent compilation cache in `directory` ('' = off), unless the environment
    ($JAX_COMPILATION_CACHE_DIR) already chose one. Why: a TPU train step or sampler takes minutes to
    compile; with the cache a resumed or repeated run loads the executables in seconds.
    Returns whether this call set it.
    """
    import jax

    if not directory or jax.config.jax_compilation_cache_dir:
        return False
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(directory))
    return True


def initialize_distributed(config) -> bool:
    """jax.distributed.initialize for config.distributed (before anything touches a device): with the coordinator,
    process count and id of config.cluster when given, else JAX's cluster auto-detection. Returns whether it ran.

    Why the explicit form: auto-detection knows Cloud TPU, Slurm, Open MPI and Kubernetes only; a plain multi-node
    GPU job, or N processes on one machine (python -m var_jax.launch), must name the coordinator themselves.
    """
    if not config.distributed:
        return False
    import jax

    from var_jax.errors import ConfigError

    c = config.cluster
    explicit = dict(
        coordinator_address=c.coordinator_address or None,
        num_processes=c.num_processes if c.num_processes > 0 else None,
        process_id=c.process_id if c.process_id >= 0 else None,
    )
    given = [k for k, v in explicit.items() if v is not None]
    if given and len(given) < 3:
        missing = sorted(set(explicit) - set(given))
        raise ConfigError(
            f'cluster.{", cluster.".join(given)} given without cluster.{", cluster.".join(missing)}: '
            f"give all three (or none, for JAX's cluster detection)"
        )
    if given and not 0 <= c.process_id < c.num_processes:
        raise ConfigError(f'cluster.process_id={c.process_id} must be in [0, cluster.num_processes={c.num_processes})')
    ids = [int(i) for i in str(c.local_device_ids).split(',') if i.strip()] or None
    jax.distributed.initialize(
        **explicit,
        local_device_ids=ids,
        initialization_timeout=c.initialization_timeout_s,
        heartbeat_timeout_seconds=c.heartbeat_timeout_s,
    )
    return True
