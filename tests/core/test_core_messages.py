"""User-facing messages of the CLI (issue 9): each test pins the exact text and exit code."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.cli import main

# --- item 8: `surgery passes` and `validate --print` ------------------------------------------


def test_passes_help_shows_factory_defaults_and_literal_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["passes", "rename-io"]) == 0
    out = capsys.readouterr().out
    assert "PydanticUndefined" not in out
    assert "  values (dict[str, str], default {})\n" in out
    assert "  scope ('io' | 'all', default 'io')\n" in out
    assert main(["passes", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "PydanticUndefined" not in out
    assert (
        "  fp32_islands (list['rmsnorm' | 'softcap' | 'softmax'], "
        "default ['rmsnorm', 'softcap', 'softmax'])\n"
    ) in out
    assert "  node_block_list (list[str], default [])\n" in out


def test_validate_print_keeps_explicit_defaults_and_counts_in_words(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    written = "layout: plain\npasses:\n- pass: optimize\n  options:\n    iterations: 2\n    inline: true\n"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(written)
    assert main(["validate", "--print", str(recipe)]) == 0
    assert capsys.readouterr().out == f"{written}{recipe}: ok, 1 pass\n"
    recipe.write_text("passes: [remove-unused, topological-sort]\n")
    assert main(["validate", "--print", str(recipe)]) == 0
    assert capsys.readouterr().out == (
        f"layout: plain\npasses:\n- pass: remove-unused\n- pass: topological-sort\n"
        f"{recipe}: ok, 2 passes\n"
    )
