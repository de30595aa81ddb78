"""Train-state checkpoints of one stage's run directory (workdir/<stage>), a thin layer over orbax.

    config.json                the run config of the latest start (written atomically)
    checkpoints/<step>/state   {params, opt_state, step, rng, nonfinite, ...}: resumes bit-exactly
    checkpoints/<step>/config  the run config saved with the step
    damaged_checkpoints/<step> a step that could not be restored, set aside (never deleted)

Why: a step directory is complete or absent (orbax writes into a temporary directory and renames it);
saving is asynchronous (`wait()`/`close()` before exit); restoring takes abstract leaves with shardings,
so a checkpoint written on N devices restores on any mesh; PRNG keys are stored as raw uint32 data; and a
run directory refuses to resume under a config whose model- or data-defining fields differ.

Preemption: inside `with checkpointer.handle_preemption():` SIGTERM only sets a flag that the loop polls
through `should_stop(step)`; it then saves and exits. With several processes JAX's preemption service owns
SIGTERM and `should_stop` asks orbax for the common sync point instead.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import json
import logging
import os
import shutil
import signal
import threading
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from var_jax.errors import DiskFullError, MissingFileError, UserError
from var_jax.fileio import atomic_write_json
from var_jax.sharding import PyTree

STATE_ITEM = 'state'
DAMAGED_SUBDIR = 'damaged_checkpoints'
CONFIG_ITEM = 'config'
CONFIG_FILE = 'config.json'
CHECKPOINT_SUBDIR = 'checkpoints'


class ConfigMismatchError(UserError):
    """The workdir holds checkpoints written with an incompatible config."""


# --- run configs ------------------------------------------------------------------------------


def config_to_dict(config: Any) -> Optional[dict]:
    """JSON-normalised dict of a ConfigDict / dict (tuples become lists, etc.).

    Both sides of a comparison go through the same JSON round trip, so a
    config compares equal to what was saved from it.
    """
    if config is None:
        return None
    if hasattr(config, 'to_json_best_effort'):  # ml_collections.ConfigDict
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=repr))


def _flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f'{prefix}{key}'
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, path + '.'))
        else:
            flat[path] = value
    return flat


def _is_resumable(key: str, patterns: Iterable[str]) -> bool:
    parts = key.split('.')
    prefixes = ['.'.join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for pat in patterns for p in prefixes)


_MISSING = '<missing>'


def config_diff(
    saved: Mapping,
    current: Mapping,
    resumable_keys: Iterable[str] = (),
    compare_keys: Optional[Sequence[str]] = None,
) -> dict[str, tuple[Any, Any]]:
    """`{dotted.key: (saved_value, current_value)}` for fields that differ.

    `compare_keys` restricts the comparison to these top-level subtrees
    (e.g. `('model', 'data')`); `None` compares everything.  Keys matching
    `resumable_keys` are ignored, and so are keys the saved config lacks: fields added to the
    project after the run started (an older workdir resumes with their current values).
    """
    a, b = _flatten(saved), _flatten(current)
    resumable_keys = tuple(resumable_keys)
    diffs = {}
    for key in sorted(set(a) | set(b)):
        if compare_keys is not None and key.split('.')[0] not in compare_keys:
            continue
        if _is_resumable(key, resumable_keys):
            continue
        if key not in a:
            continue
        va, vb = a[key], b.get(key, _MISSING)
        if va != vb:
            diffs[key] = (va, vb)
    return diffs


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs every failing read of a damaged checkpoint from its worker threads (a wall of tracebacks);
    the caller reports the failure once instead."""
    loggers = [logging.getLogger(name) for name in ('absl', 'asyncio', 'orbax', 'orbax.checkpoint')]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere down the chain: an OSError from Python, or tensorstore's error text (os_error_code 28)."""
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (
            'No space left on device' in str(error) or f"os_error_code='{errno.ENOSPC}'" in str(error)
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


class _SaveErrorsReachTheCaller(logging.Filter):
    """Drops orbax's ERROR records while a Checkpointer is open: a failed save is logged by each of its writer
    threads (a wall of tracebacks) and then raised to the caller by the next save / wait, which reports it once."""

    def filter(self, record):
        return not (record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname)


_SAVE_ERRORS_FILTER = _SaveErrorsReachTheCaller()


def _flag_value(value) -> str:
    """A config value as main.py's --config.<field>= flag takes it."""
    if isinstance(value, (list, tuple)):
        return "'(" + ','.join(str(v) for v in value) + (",)'" if len(value) == 1 else ")'")
    return repr(value) if isinstance(value, str) else str(value)


# --- preemption -------------------------------------------------------------------------------


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
        logging.warning('Received signal %d: will checkpoint and stop at the next step.', signum)
        self._event.set()

    @property
    def triggered(self) -> bool:
        return self._event.is_set()

    def __enter__(self) -> 'PreemptionHandler':
        if jax.process_count() == 1:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


# --- train-state checkpoints ------------------------------------------------------------------


def _check_no_typed_keys(state: PyTree) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        dtype = getattr(leaf, 'dtype', None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            raise TypeError(
                f'State leaf {jax.tree_util.keystr(path)} is a typed PRNG key; checkpoint raw '
                'uint32 keys instead (jax.random.key_data(key), and jax.random.wrap_key_data '
                'after restore).'
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
    """Saves / restores the train state of one run in `workdir` (checkpoints in `workdir/checkpoints`).

    Keeps the newest `max_to_keep` steps; `save` is a no-op unless `step % save_every == 0` (or `force=True`).
    With `config` (a ConfigDict or dict), the newest checkpoint's config is checked against it before anything
    is written (ConfigMismatchError; `resumable_keys` / `compare_keys`: see `config_diff`), then it is stored
    with every step and as `workdir/config.json`. `async_save=False` writes synchronously (debugging).
    """

    def __init__(
        self,
        workdir: str,
        *,
        max_to_keep: Optional[int] = 3,
        save_every: int = 1,
        config: Any = None,
        resumable_keys: Iterable[str] = (),
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
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, CONFIG_ITEM))
        self._preemption = PreemptionHandler()
        self._checkpoint_bytes = 0  # of the last save, for the message of a full disk
        logging.getLogger('absl').addFilter(_SAVE_ERRORS_FILTER)
        self._config = config_to_dict(config)
        if self._config is not None:
            while True:  # the newest step's config must be readable to compare with; else set it aside
                step = self.latest_step()
                try:
                    self.saved_config(step)
                    break
                except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a damaged step
                    self._set_aside(step, e)
            self.check_compatible(config)
            if jax.process_index() == 0:
                atomic_write_json(os.path.join(self.workdir, CONFIG_FILE), self._config)

    def latest_step(self) -> Optional[int]:
        """Newest finished (or in-flight) checkpoint step, None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def saved_config(self, step: Optional[int] = None) -> Optional[dict]:
        """Config stored with `step` (default: latest); None if absent."""
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
            lines = '\n'.join(f'  {k}: checkpoint={a!r} now={b!r}' for k, (a, b) in diffs.items())
            raise ConfigMismatchError(
                f'{self.directory} holds checkpoints (latest step {step}) written with a different '
                f'config; differing fields:\n{lines}\n'
                'To resume that run, give its values back: '
                + ' '.join(f'--config.{k}={_flag_value(a)}' for k, (a, _) in diffs.items() if a != _MISSING)
                + '\nTo start a new run with these settings, give a new --workdir.'
            )

    def save(self, step: int, state: PyTree, force: bool = False) -> bool:
        """Starts saving `state` as `step`; returns whether a save was started.

        Skipped when `step` is not a multiple of `save_every` (unless
        `force`) or is already saved (so a final forced save right after a
        regular one is harmless).  Must be called by every process.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        _check_no_typed_keys(state)
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if self._config is not None:
            items[CONFIG_ITEM] = ocp.args.JsonSave(self._config)
        self._checkpoint_bytes = sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(state))
        with self._disk_full_is_an_error():
            return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    @contextlib.contextmanager
    def _disk_full_is_an_error(self):
        """A save that runs out of space (now, or in the writer thread of the last one) becomes one DiskFullError
        naming the directory and the space a checkpoint takes; the steps saved before stay restorable."""
        try:
            yield
        except Exception as e:  # orbax may wrap the OSError: look down the chain
            if not _is_disk_full(e):
                raise
            if jax.process_index() == 0:  # the unfinished step's files take the space the user must free
                for tmp in glob.glob(os.path.join(self.directory, '*.orbax-checkpoint-tmp*')):
                    shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(self.directory).free if os.path.isdir(self.directory) else 0
            raise DiskFullError(
                f'no space left on the disk of {self.directory} while saving a checkpoint: one takes about '
                f'{self._checkpoint_bytes / 2**20:,.1f} MiB ({free / 2**20:,.0f} MiB free now). Free '
                f'some space (or lower keep_checkpoints) and run the same command again: it resumes from the newest '
                f'complete checkpoint'
            ) from None

    def restore(self, abstract_state: PyTree, step: Optional[int] = None) -> PyTree:
        """Restores `step` (default: latest) into the layout of `abstract_state`.

        `abstract_state` leaves: `jax.ShapeDtypeStruct` with the target
        `sharding` (e.g. from `sharding.with_shardings`), existing
        `jax.Array`s (their sharding is reused), or python/numpy values
        (restored on host).  A ShapeDtypeStruct without sharding is replicated
        over all devices.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise MissingFileError(f'No checkpoint in {self.directory}')
        self.wait()  # an in-flight save of this step must be finished first
        default = NamedSharding(Mesh(np.asarray(jax.devices()), ('all',)), PartitionSpec())
        target = jax.tree.map(lambda leaf: _restore_target(leaf, default), abstract_state)
        with _quiet_orbax():
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
            )
        return restored[STATE_ITEM]

    def restore_latest(self, abstract_state: PyTree) -> tuple[Optional[PyTree], int]:
        """(state, step) of the newest intact checkpoint, or (None, 0) when there is none.

        A step that cannot be restored (truncated files, missing metadata: a disk that filled up, a copy
        that stopped half-way) is moved to `workdir/damaged_checkpoints/<step>` with a warning naming it,
        never deleted, and the next older step is tried.
        """
        while (step := self.latest_step()) is not None:
            try:
                return self.restore(abstract_state, step), step
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a damaged step
                self._set_aside(step, e)
        return None, 0

    def _set_aside(self, step: int, error: Exception) -> None:
        damaged = os.path.join(self.workdir, DAMAGED_SUBDIR)
        target = os.path.join(damaged, str(step))
        if jax.process_index() == 0:
            os.makedirs(damaged, exist_ok=True)
            n = 1
            while os.path.exists(target):
                target, n = os.path.join(damaged, f'{step}.{n}'), n + 1
            os.replace(os.path.join(self.directory, str(step)), target)
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        logging.warning(
            'checkpoint step %d in %s is damaged (%s: %s); moved it to %s and fell back to the previous step',
            step,
            self.directory,
            type(error).__name__,
            reason,
            target,
        )
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until the in-flight asynchronous save (if any) is on disk."""
        with self._disk_full_is_an_error():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()
            logging.getLogger('absl').removeFilter(_SAVE_ERRORS_FILTER)

    def __enter__(self) -> 'Checkpointer':
        return self

    def __exit__(self, *exc_info) -> bool:
        self.close()
        return False

    def handle_preemption(self) -> PreemptionHandler:
        """Context manager turning SIGTERM into :attr:`preempted` (see module doc)."""
        return self._preemption

    @property
    def preempted(self) -> bool:
        """True once this process received SIGTERM inside `handle_preemption()`."""
        return self._preemption.triggered

    def should_stop(self, step: Optional[int] = None) -> bool:
        """Whether the loop should save now and exit.

        Single process: the SIGTERM flag.  Several processes: all hosts must
        call this at every step with the same `step`; it becomes True on all
        of them at the same step once any host was told to shut down.
        """
        if self.preempted:
            return True
        if jax.process_count() > 1 and step is not None:
            return bool(self._manager.reached_preemption(int(step)))
        return False
