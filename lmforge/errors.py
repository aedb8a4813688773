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


class RequestError(LmforgeError):
    """One generation request's own input failed while it ran (its logits processor left no token allowed, or
    raised): that request was aborted and the others went on. `request_id` names it. A user's input error (a
    server's 4xx), not an engine failure."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


def is_disk_full(e: BaseException | None) -> bool:
    """Whether `e`, or an exception it was raised while handling, is a full disk or quota (torch.save through a
    Python file raises a RuntimeError first and the file's ENOSPC after it; safetensors words it in its own
    error)."""
    return write_refused(e) == "disk full"


def write_refused(e: BaseException | None) -> str | None:
    """'disk full' where `e`, or an exception it was raised while handling, is a full disk or quota (see
    is_disk_full), 'read-only file system' where the file system went read-only under the writer (the kernel
    remounts one so after an I/O error), else None: what a writer's one-line error says happened."""
    import errno

    while e is not None:
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in str(e):
            return "disk full"
        if (isinstance(e, OSError) and e.errno == errno.EROFS) or "Read-only file system" in str(e):
            return "read-only file system"
        e = e.__cause__ or e.__context__
    return None


def require(module: str, extra: str):
    """Import an optional dependency, or fail with a message naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LmforgeError(
            f"this feature needs the '{module}' package: pip install 'lmforge[{extra}]'"
        ) from e


class ConfigWarning(UserWarning):
    """A config's warning of its settings' combination, given when it is built (a warmup longer than the run, ...).
    Code that copies a config the user's code already built (dataclasses.replace) ignores this category for the
    copy: the user was told once."""


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn attributed to the first frame outside lmforge: the user's line that asked for it, however
    deep inside the library the problem was found."""
    import dataclasses
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def inside(code) -> bool:  # lmforge's own code, or the dataclass machinery building one of its configs
        return (os.path.abspath(code.co_filename).startswith(package) or code.co_filename == dataclasses.__file__
                or (code.co_filename == "<string>" and code.co_name == "__init__"))

    frame, level = sys._getframe(1), 2  # stacklevel 2: the caller of warn_caller
    while frame is not None and inside(frame.f_code):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
