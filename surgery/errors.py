"""Errors a user can fix, kept apart from bugs, and hints shared by their messages.

The CLI prints a :class:`SurgeryError` as one line and exits 1; anything else is a bug
(exit 3, traceback kept).
"""

from __future__ import annotations

import os
import re
import reprlib

__all__ = ["SurgeryError", "clip", "hub_id_hint", "show"]

#: Longest echo of user input in an error line.
SHOW_LIMIT = 100

# reprlib abbreviates while it walks (it never builds the full repr of a huge value); ``show``
# then cuts what is left to a hard limit.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 6
_REPR.maxdict = 4
_REPR.maxlevel = 3

#: ``owner/name`` as the Hugging Face hub spells repository ids (no leading dot, no ``..``).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class SurgeryError(Exception):
    """A problem with the user's input: a file, a recipe, an option or a checkpoint.

    The message must say what is wrong, where (file, recipe line, pass, part) and what to do.
    """


def clip(text: str, limit: int = SHOW_LIMIT) -> str:
    """``text`` cut to at most ``limit`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show(value: object, limit: int = SHOW_LIMIT) -> str:
    """``repr(value)`` abbreviated to at most ``limit`` characters, to echo user input in a message."""
    return clip(_REPR.repr(value), limit)


def hub_id_hint(path: str | os.PathLike[str]) -> str:
    """``"; ..."`` telling how to download ``path`` when it looks like a hub id, else ``""``.

    surgery reads local folders only (no network access); a missing ``owner/name`` path is most
    likely a Hugging Face repository id that the user meant to download.
    """
    text = os.fspath(path)
    if os.path.exists(text) or not _HUB_ID.fullmatch(text) or ".." in text:
        return ""
    return (
        f"; it looks like a Hugging Face hub id, and surgery reads local folders only: "
        f"download it first (hf download {text} --local-dir DIR) and pass DIR"
    )
