"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one, never a torn one."""

import contextlib
import json
import os


@contextlib.contextmanager
def atomic_write(path: str):
    """Yields a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    The temporary name keeps the extension, so writers that pick a format by extension (PIL, np.savez) work.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f'{root}.tmp{os.getpid()}{ext}'
    try:
        yield tmp
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, obj) -> None:
    """Writes JSON (sorted keys, indented) through `atomic_write`."""
    with atomic_write(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True)
