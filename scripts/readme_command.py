"""Print the first ```bash block under a README.md section, so CI runs what the README says.

Usage: ``python scripts/readme_command.py "Quick start"`` prints the block under ``## Quick start``
(up to the next ``## `` heading). A missing section or block is an error (exit 1), never an empty
command: CI must fail loudly when the README stops matching it. Standard library only, so it runs
before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_command(section: str, readme: Path = README) -> str:
    """The first ```bash block under ``## <section>`` in ``readme``.

    Raises:
        LookupError: No such section, or no bash block in it.
    """
    text = readme.read_text(encoding="utf-8")
    heading = re.search(rf"^## {re.escape(section)}[ \t]*$", text, re.MULTILINE)
    if heading is None:
        raise LookupError(f"{readme}: no '## {section}' section")
    end = re.search(r"^## ", text[heading.end() :], re.MULTILINE)
    body = text[heading.end() : heading.end() + end.start() if end else len(text)]
    block = re.search(r"^```bash\n(.*?)^```", body, re.MULTILINE | re.DOTALL)
    if block is None or not block.group(1).strip():
        raise LookupError(f"{readme}: no ```bash block under '## {section}'")
    return block.group(1).strip()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/readme_command.py SECTION", file=sys.stderr)
        return 2
    try:
        print(readme_command(argv[0]))
    except LookupError as exc:
        print(f"readme_command: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
