"""The official weights by name: `var_jax.from_pretrained('var-d16')`, `--config.init_from=hf:var-d16`.

A name stands for files of the official Hugging Face repository FoundationVision/var (`NAMES`). They are
fetched with huggingface_hub into its own cache (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and tokens as
huggingface_hub documents them), or read from a local directory holding them (`hf:var-d16:DIR`), then
converted once (var_jax.convert, needs torch). The converted checkpoint is kept under
`$VAR_JAX_CACHE/converted/` (default ~/.cache/var_jax) in a directory keyed by the files' sha256, so a
second use loads it directly and a changed file is converted afresh. Nothing is fetched unless a name is
asked for.
"""

import hashlib
import logging
import os
import shutil
from typing import Optional

from var_jax import checkpoint
from var_jax.errors import MissingFileError
from var_jax.models.var import PATCH_NUMS_512

REPO_ID = 'FoundationVision/var'
VAE_FILE = 'vae_ch160v4096z32.pth'
# name -> the files it needs; 'vae' is the released tokenizer alone (the ImageNet recipes' init_from), with
# the 256-px scale schedule, 'vae-512' the same file with the 512-px one (configs/var_d36.py).
NAMES = {
    'vae': (VAE_FILE,),
    'vae-512': (VAE_FILE,),
    **{f'var-d{d}': (VAE_FILE, f'var_d{d}.pth') for d in (16, 20, 24, 30, 36)},
}
PREFIX = 'hf:'
CONVERTER_VERSION = 1  # part of the cache key: a converter that writes other params must not reuse old ones


def cache_root() -> str:
    default = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'var_jax')
    return os.environ.get('VAR_JAX_CACHE') or default


def _check_name(name: str) -> tuple:
    if name not in NAMES:
        raise ValueError(
            f'unknown pretrained name {name!r}; use one of {", ".join(NAMES)} (files of huggingface.co/{REPO_ID})'
        )
    return NAMES[name]


def fetch(name: str, local_dir: Optional[str] = None) -> list:
    """The local paths of the files `name` needs: from local_dir if given, else from the Hugging Face cache
    (downloading what it lacks unless HF_HUB_OFFLINE is set)."""
    files = _check_name(name)
    if local_dir is not None:
        paths = [os.path.join(os.path.expanduser(local_dir), f) for f in files]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise MissingFileError(
                f'{", ".join(missing)} not found: download {", ".join(files)} from '
                f'huggingface.co/{REPO_ID} into {local_dir}, or drop the directory to fetch '
                f'them with huggingface_hub'
            )
        return paths
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ImportError(
            f'fetching {name!r} needs huggingface_hub: pip install huggingface_hub, or download '
            f'{", ".join(files)} and use hf:{name}:DIR'
        ) from None
    paths = []
    for f in files:
        try:
            paths.append(huggingface_hub.hf_hub_download(REPO_ID, f))
        except errors.LocalEntryNotFoundError:
            raise MissingFileError(
                f'{f} of {REPO_ID} is not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) and '
                f'cannot be downloaded (offline: HF_HUB_OFFLINE or no network); run once online, or download it '
                f'and use hf:{name}:DIR'
            ) from None
        except (errors.EntryNotFoundError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
            raise MissingFileError(
                f'huggingface.co/{REPO_ID} has no {f} ({type(e).__name__}); download the '
                f'files by hand and use hf:{name}:DIR'
            ) from None
    return paths


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            h.update(block)
    return h.hexdigest()


def converted_dir(name: str, local_dir: Optional[str] = None) -> str:
    """A directory `var_jax.load_pretrained` reads, holding `name` converted; converts only on the first use
    of these exact files (the key is the sha256 of each file and the converter version)."""
    paths = fetch(name, local_dir)
    h = hashlib.sha256(f'converter {CONVERTER_VERSION}'.encode())
    for path in paths:
        h.update(f'{os.path.basename(path)} {_sha256(path)}'.encode())
    out = os.path.join(cache_root(), 'converted', f'{name}-{h.hexdigest()[:16]}')
    if os.path.exists(os.path.join(out, 'model.json')):  # written last: the directory is complete
        return out
    from var_jax import convert  # torch is needed only to convert

    logging.warning('converting %s (%s) into %s, once', name, ', '.join(paths), out)
    cfgs, params = convert.convert_files(*paths, patch_nums=PATCH_NUMS_512 if name == 'vae-512' else None)
    tmp = f'{out}.tmp{os.getpid()}'
    checkpoint.save_pretrained(tmp, cfgs, params)
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(out, 'model.json')):
            raise
    return out


def parse(ref: str) -> tuple:
    """'hf:NAME' or 'hf:NAME:DIR' -> (NAME, DIR or None)."""
    name, _, local_dir = ref[len(PREFIX) :].partition(':')
    _check_name(name)
    return name, local_dir or None


def resolve_init_from(value: str) -> str:
    """config.init_from as a directory: an 'hf:...' reference converted (see `converted_dir`), else as given."""
    if not value.startswith(PREFIX):
        return value
    return converted_dir(*parse(value))


def from_pretrained(name: str, local_dir: Optional[str] = None):
    """'var-d16' (... 'var-d36', or 'vae') -> (vqvae, vae_params, var, var_params), fetched and converted on
    first use (see the module docstring); var and var_params are None for 'vae'. 'hf:NAME[:DIR]' works too."""
    from var_jax import api

    if name.startswith(PREFIX):
        name, local_dir = parse(name) if local_dir is None else (parse(name)[0], local_dir)
    return api.load_pretrained(converted_dir(name, local_dir))
