"""Checkpointing for var_jax training runs (a thin layer over Orbax).

Layout of a workdir::

    workdir/
      config.json              # run config of the latest start (atomic tmp + os.replace)
      checkpoints/
        <step>/state/          # {params, opt_state, step, rng, data_position}
        <step>/config/         # the same run config, saved with the step
        <step>.orbax-checkpoint-tmp-*   # only while a save is in flight

Why it looks like this:

* One ``state`` item holds everything needed to resume bit-exactly, so a
  step directory is either complete or absent.  Orbax writes each step into a
  ``*.orbax-checkpoint-tmp-*`` directory and renames it when done (plus a
  ``commit_success.txt`` marker on filesystems without atomic rename); an
  interrupted save is never listed as a step and is removed at the next start.
* Saving is asynchronous: ``save`` returns once the arrays are copied to host
  and training continues while the files are written.  ``wait()`` blocks until
  the write is done; call it (or ``close()``) before the process exits.
* Restoring takes a tree of ``jax.ShapeDtypeStruct`` *with shardings* for the
  current mesh, so a checkpoint written on N devices (any FSDP layout) loads
  onto 1 device or onto another mesh.  Leaves given as plain python/numpy
  values (e.g. ``data_position``) are restored as host values, which keeps
  int64 positions exact even without ``jax_enable_x64``.
* PRNG keys must be raw ``uint32`` key data (``jax.random.PRNGKey`` or
  ``jax.random.key_data(typed_key)``; rewrap with ``jax.random.wrap_key_data``
  after restoring).  Typed key arrays are rejected with a clear error rather
  than silently coming back as a different dtype.
* Each step stores the run config, and a workdir refuses (without writing
  anything) to resume under a config whose model-defining fields differ.

Preemption: inside ``with checkpointer.handle_preemption():`` a SIGTERM only
sets a flag; the training loop polls ``should_stop(step)``, force-saves and
exits cleanly.  With several processes, JAX's distributed preemption service
owns SIGTERM and decides a common step for all hosts, so ``should_stop`` then
asks ``multihost_utils.reached_preemption_sync_point`` (through Orbax) instead
and no Python handler is installed.  Typical loop::

    ckpt = Checkpointer(workdir, max_to_keep=3, save_every=5000, config=config)
    with ckpt.handle_preemption():
        for step in range(start, total_steps):
            state = train_step(state, batch)
            ckpt.save(step + 1, state)
            if ckpt.should_stop(step + 1):
                break
        ckpt.save(step + 1, state, force=True)   # final / preemption save
    ckpt.close()                                   # waits for the write
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import signal
import threading
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

STATE_ITEM = "state"
CONFIG_ITEM = "config"
CONFIG_FILE = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"

# Config keys (fnmatch patterns on dotted paths; a pattern matching a parent
# also covers its subtree) that may change when a run is resumed: schedule
# length and bookkeeping intervals, never model or data definition.
DEFAULT_RESUMABLE_KEYS: tuple[str, ...] = (
    "*total_steps",
    "*num_train_steps",
    "*num_epochs",
    "*log_every*",
    "*eval_every*",
    "*sample_every*",
    "*save_every*",
    "*checkpoint_every*",
    "*max_to_keep*",
    "*workdir*",
)


class ConfigMismatchError(ValueError):
    """The workdir holds checkpoints written with an incompatible config."""


# ----------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------


def config_to_dict(config: Any) -> Optional[dict]:
    """JSON-normalised dict of a ConfigDict / dict (tuples become lists, etc.).

    Both sides of a comparison go through the same JSON round trip, so a
    config compares equal to what was saved from it.
    """
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=repr))


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _is_resumable(key: str, patterns: Iterable[str]) -> bool:
    parts = key.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


_MISSING = "<missing>"


def config_diff(
    saved: Mapping,
    current: Mapping,
    resumable_keys: Iterable[str] = DEFAULT_RESUMABLE_KEYS,
    compare_keys: Optional[Sequence[str]] = None,
) -> dict[str, tuple[Any, Any]]:
    """``{dotted.key: (saved_value, current_value)}`` for fields that differ.

    ``compare_keys`` restricts the comparison to these top-level subtrees
    (e.g. ``('model', 'data')``); ``None`` compares everything.  Keys matching
    ``resumable_keys`` are ignored.
    """
    a, b = _flatten(saved), _flatten(current)
    resumable_keys = tuple(resumable_keys)
    diffs = {}
    for key in sorted(set(a) | set(b)):
        if compare_keys is not None and key.split(".")[0] not in compare_keys:
            continue
        if _is_resumable(key, resumable_keys):
            continue
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            diffs[key] = (va, vb)
    return diffs


def atomic_write_json(path: str, obj: Any) -> None:
    """Writes JSON so readers see the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------


class PreemptionHandler:
    """Context manager: SIGTERM (by default) sets a flag instead of killing us.

    The previous handlers are restored on exit.  The flag stays set after
    exit so the caller can still see that a preemption happened.  Signal
    handlers can only be installed from the main thread.  With several JAX
    processes nothing is installed: JAX's preemption service handles SIGTERM
    (see :meth:`Checkpointer.should_stop`).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum, frame):  # noqa: ARG002 - signal handler signature
        logging.warning("Received signal %d: will checkpoint and stop at the next step.", signum)
        self._event.set()

    @property
    def triggered(self) -> bool:
        return self._event.is_set()

    def __enter__(self) -> "PreemptionHandler":
        if jax.process_count() == 1:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


# ----------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------


def _check_no_typed_keys(state: PyTree) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"State leaf {jax.tree_util.keystr(path)} is a typed PRNG key; checkpoint raw "
                "uint32 keys instead (jax.random.key_data(key), and jax.random.wrap_key_data "
                "after restore)."
            )


def _restore_target(leaf: Any, default_sharding: jax.sharding.Sharding) -> Any:
    """Maps one leaf of the caller's target to what Orbax should restore into."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        if leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=default_sharding)
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    # python scalars, np.ndarray, np.generic: restored as host values.
    return leaf


class Checkpointer:
    """Saves / restores the train state of one run in ``workdir``.

    Args:
      workdir: run directory; checkpoints go to ``workdir/checkpoints``.
      max_to_keep: keep only the newest K checkpoints.
      save_every: ``save`` is a no-op unless ``step % save_every == 0``
        (or ``force=True``).
      config: run config (ConfigDict or dict).  When given, it is checked
        against the latest checkpoint's config before anything is written
        (raises :class:`ConfigMismatchError`), then stored with every step
        and as ``workdir/config.json``.
      resumable_keys / compare_keys: see :func:`config_diff`.
      async_save: write in a background thread (default); False for
        synchronous saves (debugging).
    """

    def __init__(
        self,
        workdir: str,
        *,
        max_to_keep: Optional[int] = 3,
        save_every: int = 1,
        config: Any = None,
        resumable_keys: Iterable[str] = DEFAULT_RESUMABLE_KEYS,
        compare_keys: Optional[Sequence[str]] = None,
        async_save: bool = True,
    ):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.directory = os.path.join(self.workdir, CHECKPOINT_SUBDIR)
        self.resumable_keys = tuple(resumable_keys)
        self.compare_keys = compare_keys
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # Exactly "every save_every steps, or at a multi-host preemption
            # sync point"; Orbax's default would also save the first step seen.
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]
            ),
            # Leftovers of an interrupted save are deleted at start-up.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE_ITEM, CONFIG_ITEM)
        )
        self._preemption = PreemptionHandler()
        self._config = config_to_dict(config)
        if self._config is not None:
            self.check_compatible(config)
            if jax.process_index() == 0:
                atomic_write_json(os.path.join(self.workdir, CONFIG_FILE), self._config)

    # -- queries ---------------------------------------------------------------

    def latest_step(self) -> Optional[int]:
        """Newest finished (or in-flight) checkpoint step, None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def saved_config(self, step: Optional[int] = None) -> Optional[dict]:
        """Config stored with ``step`` (default: latest); None if absent."""
        step = self.latest_step() if step is None else step
        if step is None or not os.path.isdir(os.path.join(self.directory, str(step), CONFIG_ITEM)):
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
        return restored[CONFIG_ITEM]

    def check_compatible(self, config: Any) -> None:
        """Raises ConfigMismatchError listing every differing non-resumable field."""
        step = self.latest_step()
        saved = self.saved_config(step)
        if saved is None:
            return
        diffs = config_diff(saved, config_to_dict(config), self.resumable_keys, self.compare_keys)
        if diffs:
            lines = "\n".join(f"  {k}: checkpoint={a!r} now={b!r}" for k, (a, b) in diffs.items())
            raise ConfigMismatchError(
                f"{self.directory} holds checkpoints (latest step {step}) written with a different "
                f"config; differing fields:\n{lines}\n"
                "Use a new workdir, or list the fields in resumable_keys if they may change on resume."
            )

    # -- save / restore --------------------------------------------------------

    def save(self, step: int, state: PyTree, force: bool = False) -> bool:
        """Starts saving ``state`` as ``step``; returns whether a save was started.

        Skipped when ``step`` is not a multiple of ``save_every`` (unless
        ``force``) or is already saved (so a final forced save right after a
        regular one is harmless).  Must be called by every process.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        _check_no_typed_keys(state)
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if self._config is not None:
            items[CONFIG_ITEM] = ocp.args.JsonSave(self._config)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: PyTree, step: Optional[int] = None) -> PyTree:
        """Restores ``step`` (default: latest) into the layout of ``abstract_state``.

        ``abstract_state`` leaves: ``jax.ShapeDtypeStruct`` with the target
        ``sharding`` (e.g. from ``sharding.with_shardings``), existing
        ``jax.Array``s (their sharding is reused), or python/numpy values
        (restored on host).  A ShapeDtypeStruct without sharding is replicated
        over all devices.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        self.wait()  # an in-flight save of this step must be finished first
        default = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())
        target = jax.tree.map(lambda leaf: _restore_target(leaf, default), abstract_state)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
        )
        return restored[STATE_ITEM]

    def wait(self) -> None:
        """Blocks until the in-flight asynchronous save (if any) is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    # -- preemption ------------------------------------------------------------

    def handle_preemption(self) -> PreemptionHandler:
        """Context manager turning SIGTERM into :attr:`preempted` (see module doc)."""
        return self._preemption

    @property
    def preempted(self) -> bool:
        """True once this process received SIGTERM inside ``handle_preemption()``."""
        return self._preemption.triggered

    def should_stop(self, step: Optional[int] = None) -> bool:
        """Whether the loop should save now and exit.

        Single process: the SIGTERM flag.  Several processes: all hosts must
        call this at every step with the same ``step``; it becomes True on all
        of them at the same step once any host was told to shut down.
        """
        if self.preempted:
            return True
        if jax.process_count() > 1 and step is not None:
            return bool(self._manager.reached_preemption(int(step)))
        return False
