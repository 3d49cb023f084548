"""Reading the JSON files of a checkpoint (config, preprocessor, generation) with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError

__all__ = ["read_json_object"]


def read_json_object(path: Path, *, fix: str = "fix or replace it") -> dict[str, Any]:
    """Parse ``path`` as a JSON object; a missing, unreadable or non-object file is a user error.

    Args:
        path: The file.
        fix: What the user should do, appended to the message.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SurgeryError(f"{path}: missing; {fix}") from None
    except (OSError, ValueError) as exc:
        raise SurgeryError(f"{path}: not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise SurgeryError(f"{path}: not a JSON object; {fix}")
    return data
