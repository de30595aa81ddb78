"""Params files: "model config + params" on disk, what a run exports and what the converter writes.

    model.json   the models' constructor arguments ({'vae': {...}, 'var': {...}})
    params/      their params, one orbax tree {'vae': ..., 'var': ...}

model.json is written last, so a directory that has one holds complete params.
"""

import hashlib
import json
import os
from typing import Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from var_jax.checkpoint.train_state import atomic_write_json
from var_jax.errors import MissingFileError, UserError
from var_jax.models.stacking import BLOCKS, stack_blocks
from var_jax.sharding import PyTree

# Model fields that choose how the math runs, not what it is: a params file fits whatever they are set to.
COMPUTE_CHOICES = ('dtype', 'scan', 'remat', 'attention', 'encode_precision', 'decode_precision', 'decode_dtype')


class ParamsFileError(UserError):
    """A params directory that is missing, unreadable or does not fit the model it should hold."""


def model_config(model) -> dict:
    """Constructor kwargs of a linen module (its dataclass fields), JSON-friendly."""
    out = {}
    for name in model.__dataclass_fields__:
        if name in ('parent', 'name'):
            continue
        v = getattr(model, name)
        out[name] = str(jax.numpy.dtype(v)) if name == 'dtype' else list(v) if isinstance(v, tuple) else v
    return out


def export_dir(workdir: str) -> str:
    """Where a run leaves its final models (both stages), in the format of `python -m var_jax.convert`."""
    return os.path.join(workdir, 'export')


def find_trained_var(workdir: str, init_from: str = '') -> Optional[str]:
    """The params directory a command samples from: the run's export, else init_from; None when neither holds
    a VAR (a model.json with a "var" entry)."""
    for path in [export_dir(workdir)] + ([init_from] if init_from else []):
        if os.path.exists(os.path.join(path, 'model.json')) and 'var' in load_model_config(path):
            return os.path.abspath(path)
    return None


def fingerprint(params: PyTree, header: Optional[Mapping] = None) -> str:
    """sha256 of params (every leaf's path, dtype, shape and bytes) and of a JSON-able header (e.g. a config):
    what a cache computed from the params records, so that it is never reused for other params."""
    h = hashlib.sha256(json.dumps(header or {}, sort_keys=True, default=str).encode())
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(leaf)
        h.update(f'{jax.tree_util.keystr(path)} {a.dtype} {a.shape}'.encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_pretrained(out_dir: str, model_configs: Mapping[str, dict], params: Mapping[str, PyTree]) -> None:
    """Writes params (out_dir/params, orbax) and their models' constructor kwargs (out_dir/model.json).

    model_configs / params: {'vae': ..., 'var': ...} (either may be absent). model.json is written last,
    so a directory with a model.json holds complete params. Every process of a run must call it.
    """
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:  # with several processes: all call it (orbax syncs them), one writes
        ckptr.save(os.path.join(out_dir, 'params'), dict(params), force=True)
    cfgs = {
        name: {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()} for name, c in model_configs.items()
    }
    if jax.process_index() == 0:
        atomic_write_json(os.path.join(out_dir, 'model.json'), cfgs)


def load_model_config(ckpt_dir: str) -> dict:
    """The model.json of a params directory: {'vae': kwargs[, 'var': kwargs]}, checked; cheap (no params)."""
    cfg_path = os.path.join(os.path.abspath(ckpt_dir), 'model.json')
    if not os.path.exists(cfg_path):
        raise MissingFileError(
            f"{cfg_path} not found: {ckpt_dir} is not a converted checkpoint or a run's "
            f'export; create one with python -m var_jax.convert --vae ... --var ... '
            f'--out {ckpt_dir}'
        )
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        if (
            not isinstance(cfg, dict)
            or not cfg
            or not set(cfg) <= {'vae', 'var'}
            or not all(isinstance(c, dict) for c in cfg.values())
        ):
            raise ValueError('expected {"vae": {...}, "var": {...}}')
    except ValueError as e:
        raise ParamsFileError(
            f'{cfg_path} is not a valid model config ({e}); re-create the directory with '
            f'python -m var_jax.convert or re-export the run'
        ) from None
    return {name: {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()} for name, c in cfg.items()}


def load_pretrained(ckpt_dir: str):
    """Reads what `save_pretrained` wrote: ({'vae': kwargs, 'var': kwargs}, {'vae': params, 'var': params})."""
    cfg = load_model_config(ckpt_dir)
    params_dir = os.path.join(os.path.abspath(ckpt_dir), 'params')
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(params_dir)
    except Exception as e:  # orbax raises many kinds for a damaged tree
        raise ParamsFileError(
            f'cannot read the params in {params_dir} ({type(e).__name__}: '
            f'{str(e).splitlines()[0] if str(e) else ""}); the directory is incomplete or '
            f'damaged: re-create it with python -m var_jax.convert or re-export the run'
        ) from None
    if set(params) != set(cfg):
        raise ParamsFileError(f'{ckpt_dir}: model.json describes {sorted(cfg)} but params/ holds {sorted(params)}')
    if 'var' in params and f'{BLOCKS}_0' in params['var']:  # written before the blocks were stacked
        params = dict(params, var=stack_blocks(params['var']))
    return cfg, params


def check_model_config(name: str, saved: Mapping, model) -> None:
    """Raises if the model built from the run config differs from the saved one (e.g. init_from's)."""
    for k, v in saved.items():
        if k not in COMPUTE_CHOICES and getattr(model, k, v) != v:
            raise ValueError(
                f'init_from {name} has {k}={v} but the config builds {k}={getattr(model, k)}; '
                f'set config.{name}.{k} = {v!r} (or leave init_from empty)'
            )
