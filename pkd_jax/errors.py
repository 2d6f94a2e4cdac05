"""The errors a user can fix: a bad config, bad data, a missing or mismatched model.

Research code catches `PkdError` (or one kind); run.py turns any of them into one line on stderr
and exit status 2, while every other exception is a bug and keeps its traceback (exit 1). Each
kind is also a ValueError, which is what these errors were before the hierarchy existed.
"""


class PkdError(ValueError):
    """A problem with the user's input; the message names the file, key or value and the fix."""


class ConfigError(PkdError):
    """A config value outside what the model, the data or the backend allow."""


class DataError(PkdError):
    """A data file or record that cannot be read faithfully, or a split unfit for training."""


class CheckpointError(PkdError):
    """A model folder, checkpoint or teacher run that is missing, unreadable or does not fit the run."""


class WorkdirInUse(PkdError):
    """Another process is training in the workdir (two writers would interleave its checkpoints)."""
