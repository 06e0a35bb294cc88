"""Names a user gives that become part of a path (run, dataset, revision, model), checked before any work.

A run name of ``..`` once put a run's report into the repository root and its data files into the
``data/`` package, and a 5,000-character one failed with ``Errno 36`` after every analysis had
run. So each such name is checked when the options are read: one folder name (or, for a
revision or model, names joined by ``/`` as Git and the Hub allow), no ``..``, no leading dot,
no control characters, and a length a file system takes. The error is one line.
"""

from __future__ import annotations

import re

MAX_NAME = 128  # one folder name the toolkit makes from a user's name (run, dataset)
MAX_COMPONENT = 255  # what file systems take for one name
MAX_PATH_NAME = 1024  # a revision or model name with several parts
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadNameError(ValueError):
    """A name the user gave cannot be used where it would become a path; the message is one line."""


def _shown(value: str) -> str:
    """The value as an error quotes it: escaped (a newline cannot break the line) and cut to a readable length."""
    return repr(value if len(value) <= 60 else value[:60] + "...")


def _why_not_component(part: str, max_len: int) -> str | None:
    if not part:
        return "it is empty"
    if part in (".", ".."):
        return "'.' and '..' name no folder of their own"
    if "/" in part or "\\" in part:
        return "it holds a path separator"
    if part.startswith("."):
        return "it starts with a dot (hidden files are the toolkit's temporary ones)"
    if _CONTROL.search(part):
        return "it holds a control character"
    if len(part) > max_len:
        return f"it is {len(part)} characters long, more than {max_len}"
    return None


def check_name(what: str, value: object, *, max_len: int = MAX_NAME) -> str:
    """``value`` if it can be one folder name, else a one-line :class:`BadNameError` naming ``what`` and why."""
    if not isinstance(value, str):
        raise BadNameError(f"{what} must be text, not {type(value).__name__}")
    why = _why_not_component(value, max_len)
    if why:
        raise BadNameError(f"{what} {_shown(value)} cannot name a folder: {why}")
    return value


def check_path_name(what: str, value: object, *, max_len: int = MAX_PATH_NAME) -> str:
    """``value`` if it is a name of parts joined by ``/`` (a Git revision, a Hub id), each a folder name; else one line.

    A leading ``/`` is refused too: such a name is a path, and the toolkit files what it writes
    under its own folders.
    """
    if not isinstance(value, str):
        raise BadNameError(f"{what} must be text, not {type(value).__name__}")
    if len(value) > max_len:
        raise BadNameError(f"{what} {_shown(value)} is {len(value)} characters long, more than {max_len}")
    for part in value.split("/"):
        why = _why_not_component(part, MAX_COMPONENT)
        if why:
            raise BadNameError(f"{what} {_shown(value)} cannot be used in a path: a part {why}")
    return value


def check_path_length(what: str, value: object, *, max_len: int = MAX_PATH_NAME) -> str:
    """A user's path (a model folder) the file system can take: each part at most 255 characters, no control character."""
    if not isinstance(value, str):
        raise BadNameError(f"{what} must be text, not {type(value).__name__}")
    if len(value) > max_len:
        raise BadNameError(f"{what} {_shown(value)} is {len(value)} characters long, more than {max_len}")
    if _CONTROL.search(value):
        raise BadNameError(f"{what} {_shown(value)} holds a control character")
    long = [p for p in value.split("/") if len(p) > MAX_COMPONENT]
    if long:
        raise BadNameError(f"{what} {_shown(value)} has a part of {len(long[0])} characters, more than {MAX_COMPONENT}")
    return value
