"""Everything var_jax keeps on disk with orbax: a stage's train-state checkpoints (`train_state`) and params
files, the run's export and the converted official checkpoints (`params`)."""

from var_jax.checkpoint.params import (
    ParamsFileError,
    check_model_config,
    export_dir,
    find_trained_var,
    fingerprint,
    load_model_config,
    load_pretrained,
    model_config,
    save_pretrained,
)
from var_jax.checkpoint.train_state import (
    Checkpointer,
    ConfigMismatchError,
    PreemptionHandler,
    atomic_write_json,
    config_diff,
    config_to_dict,
)

__all__ = [
    'Checkpointer',
    'ConfigMismatchError',
    'ParamsFileError',
    'PreemptionHandler',
    'atomic_write_json',
    'check_model_config',
    'config_diff',
    'config_to_dict',
    'export_dir',
    'find_trained_var',
    'fingerprint',
    'load_model_config',
    'load_pretrained',
    'model_config',
    'save_pretrained',
]
