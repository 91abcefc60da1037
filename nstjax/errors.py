"""Exceptions for user mistakes, `UserError` and its subclass `PluginError`: the CLI prints
either as one line and exits 2; and the helpers that keep any error to one line."""

import contextlib
import reprlib

PREVIEW = 60  # characters of a user's value echoed in an error

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = PREVIEW
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


class UserError(Exception):
    """Bad input from the user (file, config key, value): message names it and says what to do."""


def cut(text: str, limit: int = PREVIEW) -> str:
    """`text` cut to `limit` characters (ending in ...)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def preview(value: object) -> str:
    """A short repr of a value of any size or depth, for echoing in a one-line error."""
    return cut(_repr.repr(value))


def check_flags(a: object, bounds: dict[str, tuple[int, int]]) -> None:
    """Each integer flag `--name` (attribute `name` of the parsed arguments; None: not given)
    within `lo..hi` of `bounds[name]`, else a one-line UserError naming the flag."""
    for name, (lo, hi) in bounds.items():
        v = getattr(a, name)
        if v is not None and not lo <= v <= hi:
            raise UserError(f"--{name.replace('_', '-')} {v}: must be in {lo}..{hi}")


class PluginError(UserError):
    """User code (a loss or metric plugin, an objective or callback passed to the API) raised
    or broke its contract; the message names the code and the rule."""


def one_line(e: BaseException) -> str:
    """An exception as one line: a UserError's own message; any other as "<Type>: <its first
    line>", at most 500 characters."""
    if isinstance(e, UserError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def plugin_failed(name: str, doing: str, e: BaseException) -> PluginError:
    """The one-line `PluginError` for user code `name` that raised `e` while `doing`:
    "<name>: <doing> failed: <ExceptionType>: <message, whitespace collapsed>"."""
    msg = " ".join(str(e).split()) or "(no message)"
    return PluginError(f"{name}: {doing} failed: {type(e).__name__}: {cut(msg, 300)}")


@contextlib.contextmanager
def user_code(name: str, doing: str):
    """Turn any exception raised by user code inside the block into one-line `PluginError`s:
    "<name>: <doing> failed: <ExceptionType>: <message>" (a UserError passes as it is)."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - user code may raise anything
        raise plugin_failed(name, doing, e) from e
