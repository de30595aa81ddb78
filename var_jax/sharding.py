"""Device mesh and sharding rules for var_jax training.

One 2-D mesh with axes ('data', 'fsdp') covers both parallelism modes:

* data parallel: `fsdp=1`; every device holds a full copy of the params and
  the batch is split over all devices.
* FSDP (ZeRO-3 style): `fsdp>1`; large params (and their optimizer moments)
  are split over the 'fsdp' axis, so memory per device shrinks, while the batch
  is still split over *all* devices ('data' and 'fsdp' jointly).  XLA inserts
  the all-gathers / reduce-scatters from the declared shardings.

Everything here is explicit `NamedSharding`: a jitted train step declares
`in_shardings`/`out_shardings` with the trees returned by
:func:`param_sharding` / :func:`batch_sharding` / :func:`replicated`, and no
ambient mesh context is needed.  The mesh axes are `AxisType.Auto` so the
model code needs no sharding annotations: the compiler propagates shardings
from the jit boundary (with `Explicit` axes every op touching a sharded
contracting dimension would need an explicit `out_sharding`).

The rules depend only on leaf shapes, so the same function shards params,
optimizer states (Adam moments shard like their params; scalars such as
`count` stay replicated) and whole train-state dicts.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Params smaller than this many elements stay replicated under FSDP: splitting
# them saves little memory and costs one collective each per step.
DEFAULT_MIN_SHARD_SIZE = 2**18

PyTree = Any


def make_mesh(fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """Builds the ('data', 'fsdp') mesh with `data = n_devices // fsdp`.

    `devices` defaults to all global devices (every host's), which is what a
    multi-host run needs; pass a subset to run on fewer devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp != 0:
        raise ValueError(
            f'fsdp={fsdp} must be a positive divisor of the number of devices ({n}); '
            f'valid choices: {[d for d in range(1, n + 1) if n % d == 0]}'
        )
    shape, types = (n // fsdp, fsdp), (AxisType.Auto, AxisType.Auto)
    try:
        return jax.make_mesh(shape, BATCH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:
        # A TPU torus fits a mesh axis only to a product of its physical axes (fsdp 8 on a 4x4x4 pod is not
        # one); then the FSDP groups span part of a physical axis: valid, with slower collectives.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, BATCH_AXES, axis_types=types)


def replicated(mesh: Mesh) -> NamedSharding:
    """Full copy on every device (scalars, metrics, small params, PRNG keys)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading (batch) axis over all devices, i.e. over ('data', 'fsdp').

    Under FSDP the devices of one 'fsdp' group still see different examples;
    only the params are shared between them.  Trailing axes are replicated, so
    the same sharding fits images, labels and token tensors of any rank.
    """
    return NamedSharding(mesh, P(BATCH_AXES))


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
    # ShapeDtypeStruct, jax.Array and np.ndarray all have .shape; python
    # scalars (e.g. a step counter kept as int) are rank 0.
    return tuple(getattr(leaf, 'shape', np.shape(leaf)))


def _leaf_dtype(leaf: Any) -> np.dtype:
    return leaf.dtype if hasattr(leaf, 'dtype') else np.result_type(leaf)


def leaf_spec(shape: Sequence[int], fsdp: int, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> P:
    """PartitionSpec of one array under the FSDP rule.

    Split along the largest dimension divisible by `fsdp` (first one on
    ties) when the array has at least `min_size` elements; otherwise (or if
    no dimension divides evenly) replicate.  Choosing the largest dimension
    keeps per-device shards as large and contiguous as possible.
    """
    shape = tuple(int(d) for d in shape)
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: shape[i])  # max keeps the first on ties
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return P(*spec)


def param_sharding(mesh: Mesh, abstract_params: PyTree, min_size: int = DEFAULT_MIN_SHARD_SIZE) -> PyTree:
    """Pytree of `NamedSharding` (same structure as `abstract_params`).

    Accepts `jax.ShapeDtypeStruct` trees (from `jax.eval_shape`), concrete
    arrays, optax optimizer states or a whole train-state dict: the rule of
    :func:`leaf_spec` is applied leaf by leaf, so it only looks at shapes.
    Everything is replicated when `mesh.shape['fsdp'] == 1`.
    """
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, leaf_spec(_leaf_shape(leaf), fsdp, min_size)),
        abstract_params,
    )


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """Attaches shardings to a tree of shapes/arrays -> tree of `jax.ShapeDtypeStruct`.

    This is the target a checkpoint restore needs: shapes and dtypes of the
    state plus where each array must land on the *current* mesh.
    """
    return jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(_leaf_shape(leaf), _leaf_dtype(leaf), sharding=s),
        abstract,
        shardings,
    )


def init_sharded(
    init_fn: Callable[..., PyTree],
    mesh: Mesh,
    *args: Any,
    min_size: int = DEFAULT_MIN_SHARD_SIZE,
) -> tuple[PyTree, PyTree]:
    """Runs `init_fn(*args)` so that its outputs are born sharded.

    Shapes come from `jax.eval_shape` (no memory, no FLOPs); the real init is
    then jitted with `out_shardings`, so no device ever materialises the
    full unsharded params (which would not fit for the big models under FSDP).
    Non-array arguments (modules, configs) should be closed over with
    `functools.partial` since jit traces every positional argument.

    Returns `(params, shardings)`.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_sharding(mesh, abstract, min_size=min_size)
    params = jax.jit(init_fn, out_shardings=shardings)(*args)
    return params, shardings


def global_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
    """Turns this host's slice of the batch into global `jax.Array`s.

    Every host loads `global_batch_size // process_count` examples; the
    result has the global batch as leading dimension, laid out with
    :func:`batch_sharding`.  On a single host this is a sharded device_put.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        local_batch,
    )


def to_host(x) -> np.ndarray:
    """The whole of a (possibly multi-host) global array as numpy, on every host.

    On one host a plain copy; across hosts an all-gather, which every process must call (a collective).
    """
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
