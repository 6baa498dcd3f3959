"""Errors that speak to the user: each names the file, row, column or key and what was expected."""


class PosttrainError(Exception):
    """Base class; the CLI prints these as one paragraph and exits with status 2, no traceback."""


class ConfigError(PosttrainError):
    """A config file or override is wrong (unknown key, wrong type, missing value)."""


class DataError(PosttrainError):
    """A data file or row is wrong; the message names the file, the row number and the column."""


class ModelNotFoundError(PosttrainError):
    """A model name or path cannot be resolved; the message says what to install or where to put it."""


class DiskFullError(PosttrainError):
    """The disk filled up while writing; what was being written is discarded, earlier files are kept."""
