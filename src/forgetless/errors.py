"""User-facing errors: one clear message, no deep traceback (the CLI prints these and exits 2)."""


class ForgetlessError(Exception):
    """Base class for errors caused by the user's input (config, data, model path)."""


class ConfigError(ForgetlessError):
    """A config key is unknown, missing or of the wrong type; the message names the key."""


class DataError(ForgetlessError):
    """A data file is missing or malformed; the message names the file, line and field."""


class ModelError(ForgetlessError):
    """A model cannot be found locally or cannot be loaded."""


class TrainingError(ForgetlessError):
    """Training cannot continue (e.g. repeated non-finite losses)."""
