"""`surgery verify` and `surgery demo`: greedy parity with PyTorch, and mismatches caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from surgery import load, save
from surgery.cli import main


def test_verify_exported_graph_matches_generate(
    paligemma2_onnx: Path, paligemma2_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["verify", str(paligemma2_onnx), "--checkpoint", str(paligemma2_checkpoint)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("identical: 20 tokens per row") == 2  # batch 1 and the left-padded batch 2


def test_verify_reports_the_first_divergence(
    paligemma2_onnx: Path,
    paligemma2_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = load(paligemma2_onnx)
    graph = bundle["model"].graph
    name = next(n for n in graph.initializers if "lm_head" in n or "embed_tokens" in n)
    value = graph.initializers[name]
    original = value.const_value
    assert original is not None
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(original.shape.numpy(), dtype=np.float32)
    value.const_value = ir.tensor(original.numpy() + noise, name=name)  # a different model
    save(bundle, tmp_path / "broken", progress=False)
    code = main(
        [
            "verify",
            str(tmp_path / "broken" / "model.onnx"),
            "--checkpoint",
            str(paligemma2_checkpoint),
            "--max-new-tokens",
            "5",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "first divergence at step 0:" in captured.out
    assert "row 0 PyTorch top-5:" in captured.out
    assert captured.err.strip().endswith("greedy tokens differ from PyTorch (see the table above)")


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 0
    assert "demo: greedy tokens identical to PyTorch" in capsys.readouterr().out
    assert (tmp_path / "demo" / "checkpoint" / "config.json").is_file()
    # The next step a user takes: the demo's model still finds its checkpoint, the temporary
    # folder it was built in being gone.
    model = tmp_path / "demo" / "model.onnx"
    assert load(model)["model"].metadata_props["onnx_surgery.checkpoint"] == "checkpoint"
    assert main(["apply", "paligemma2", str(model), "-o", str(tmp_path / "again"), "-q"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_near_ties_accepts_only_flips_of_a_small_lead() -> None:
    from surgery.verify import NEAR_TIE, GreedyResult, near_ties

    want = np.array([[3.0, 2.99, 0.0], [1.0, 0.0, 0.5]], np.float32)  # row 0: a near-tie
    reference = GreedyResult(np.array([[0], [0]]), [want])
    flipped = want.copy()
    flipped[0, 1] = 3.001  # row 0 picks token 1, which PyTorch ranks 0.01 lower
    ok, report = near_ties(reference, GreedyResult(np.array([[1], [0]]), [flipped]), "case")
    assert ok, report
    assert report.splitlines()[2] == (
        f"  step 0 row 0: 1 instead of 0, which PyTorch ranks 1.00e-02 higher: a near-tie "
        f"(< {NEAR_TIE})"
    )
    far = want.copy()
    far[1, 2] = 1.2  # row 1 picks token 2, 0.5 behind: not a near-tie
    ok, report = near_ties(reference, GreedyResult(np.array([[0], [2]]), [far]), "case")
    assert not ok
    assert "step 0 row 1: 2 instead of 0, which PyTorch ranks 5.00e-01 higher: NOT a near-tie" in (
        report
    )
