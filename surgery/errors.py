"""Errors a user can fix, kept apart from bugs.

The CLI prints a :class:`SurgeryError` as one line and exits 1; anything else is a bug
(exit 3, traceback kept).
"""

from __future__ import annotations

__all__ = ["SurgeryError"]


class SurgeryError(Exception):
    """A problem with the user's input: a file, a recipe, an option or a checkpoint.

    The message must say what is wrong, where (file, recipe line, pass, part) and what to do.
    """
