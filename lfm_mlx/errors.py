"""User errors: mistakes in what a user passed (config, data, model directory, paths, disk space,
a directory another run holds). `lfm-mlx VERB` prints their message on one line and exits 2;
any other exception is an internal error and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message names the file, line or key, the value and the fix."""


class InvalidInput(UserError, ValueError):
    """A bad value in a file or argument (still a ValueError for callers that catch those)."""


class MissingInput(UserError, FileNotFoundError):
    """A file or directory that should exist does not."""


class DiskFull(UserError, OSError):
    """Not enough free space for a write; the message names the path, the bytes needed and free."""


class DirectoryBusy(UserError, RuntimeError):
    """Another live process holds the lock of a run or output directory."""


def debugging() -> bool:
    """LFM_MLX_DEBUG=1: user errors keep their traceback too."""
    import os

    return os.environ.get("LFM_MLX_DEBUG") == "1"


def read_json_input(path, missing_fix: str, bad_fix: str):
    """A user-given JSON file, or MissingInput / InvalidInput naming the path and the fix."""
    import json

    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingInput(f"{path} does not exist; {missing_fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInput(f"{path} is not JSON ({err}); {bad_fix}") from None
