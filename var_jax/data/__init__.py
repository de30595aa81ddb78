"""Training and evaluation images: where they come from, how they are prepared, how they are batched.

`config` checks `config.data`; `sources` reads TFDS, image folders and the offline `synthetic`
dataset; `preprocessing` is the official VAR transform; `iterators` makes the resumable batches;
`tokens` caches the frozen tokenizer's token maps of the training set (data.pretokenize) and batches them.
Only this package uses TensorFlow, and it is imported when a function below is first called, so
importing the package (the trainers, the benchmarks) stays cheap and changes nothing in TF.
"""

import importlib
import logging

_SUBMODULES = ('config', 'iterators', 'preprocessing', 'sources', 'synthetic', 'tokens')
_PUBLIC = {  # name -> submodule that defines it
    'make_train_iterator': 'iterators',
    'make_eval_iterator': 'iterators',
    'make_token_iterator': 'tokens',
    'build_token_cache': 'tokens',
    'num_classes': 'sources',
    'validate_config': 'config',
}
__all__ = ['hide_accelerators_from_tensorflow', *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f'{__name__}.{_PUBLIC[name]}'), name)
    if name in _SUBMODULES:
        return importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted({*globals(), *__all__, *_SUBMODULES})


def hide_accelerators_from_tensorflow() -> bool:
    """Makes TensorFlow see only the CPU, so the input pipeline cannot take GPU/TPU memory from JAX.

    Call it once at program start (main.py does), before any data function; it is not an import side
    effect, so importing this package leaves TF alone. Returns False, with a warning, when TF has
    already set up an accelerator and may hold its memory.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices(tf.config.list_physical_devices('CPU'))
    except RuntimeError:  # TF's devices are initialised already: the visibility can no longer change.
        visible = [d.name for d in tf.config.get_visible_devices() if d.device_type != 'CPU']
        if visible:
            logging.warning(
                'TensorFlow was initialised before hide_accelerators_from_tensorflow() and sees %s; '
                'it may hold memory JAX needs. Call it before any data function.',
                visible,
            )
            return False
    return True
