"""One error contract: every error class of var_jax that a user can cause derives from errors.UserError,
which main.py and the converter's command line turn into one line and exit code 2."""

import importlib
import inspect
import pkgutil

import var_jax
from var_jax import errors

# Error classes a user cannot fix by changing a setting or a file: main.py maps them to their own exit codes.
NOT_USER_ERRORS = {
    'var_jax.trainers.loop.NonFiniteError',  # exit 3: the loss diverged
    'var_jax.trainers.loop.Preempted',  # exit 75: resumable
}


def _error_classes():
    """Every exception class defined in a module of the package (imported: none needs a GPU or torch)."""
    found = {}
    for info in pkgutil.walk_packages(var_jax.__path__, 'var_jax.'):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f'{info.name}.{name}'] = obj
    return found


def test_every_user_causable_error_is_a_user_error():
    classes = _error_classes()
    assert len(classes) >= 10 and 'var_jax.models.inception.InceptionWeightsError' in classes  # the walk works
    outside = sorted(n for n, c in classes.items() if not issubclass(c, errors.UserError) and n not in NOT_USER_ERRORS)
    assert not outside, f'error classes a user can cause that main.py would not report in one line: {outside}'
    assert NOT_USER_ERRORS <= set(classes), 'a listed exception no longer exists: update NOT_USER_ERRORS'


def test_user_errors_stay_what_callers_catch():
    """Library callers catch ValueError (and FileNotFoundError / OSError for files): still true."""
    assert issubclass(errors.UserError, ValueError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    assert issubclass(errors.DiskFullError, OSError)
