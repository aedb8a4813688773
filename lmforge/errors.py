"""User-facing errors: one line that names the problem and the fix. The CLI prints them without a
traceback (unless --debug); library users catch `LmforgeError`."""


class LmforgeError(Exception):
    """An error caused by the user's input (config, files, arguments), not by a bug in lmforge."""


class ConfigError(LmforgeError, ValueError):
    """An invalid or unknown configuration field."""


class DataError(LmforgeError):
    """A missing, empty or corrupt data/token/tokenizer file."""


class CheckpointError(LmforgeError):
    """A checkpoint that is missing, truncated, or made for a different config."""


class TrainingDiverged(LmforgeError):
    """The loss became NaN or infinite."""


def require(module: str, extra: str):
    """Import an optional dependency, or fail with a message naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LmforgeError(
            f"this feature needs the '{module}' package: pip install 'lmforge[{extra}]'"
        ) from e
