"""The errors a user can fix: bad settings, missing or wrong files, a full disk.

Every such error derives from UserError, so main.py and the converter's command line catch it once and
print its message in one line with exit code 2 (README's exit codes); anything else is a bug and keeps its
traceback. UserError is a ValueError, so library callers that catch ValueError keep working.
tests/test_errors.py fails when an error class of the package is neither under UserError nor listed there as
one a user cannot cause.
"""


class UserError(ValueError):
    """Something the user can fix; the message names it and says how."""


class ConfigError(UserError):
    """Settings that cannot work; the message names every bad field and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory a run needs is not there (also a FileNotFoundError, for callers that catch that)."""


class DiskFullError(UserError, OSError):
    """A write ran out of space; the message names the directory and roughly what it needs."""
