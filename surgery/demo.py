"""``surgery demo``: the whole path on a tiny random PaliGemma 2, with no download.

make a random checkpoint → export one ONNX graph → run the flagship recipe (the Transformers.js
folder, fp32 and fp16) → inspect the result → compare greedy generation with PyTorch.

Each step's output is written atomically into the work folder as soon as the step ends
(``checkpoint/``, ``model.onnx`` + ``model.onnx.data``, ``out/``), rather than the whole folder at
the end: a step that fails late (verification, after a minute of export) keeps what the earlier
steps made, for the user to look at or to rerun a command on, and the message says what is kept.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import surgery.builtins  # noqa: F401  (the recipe names built-in passes and layouts)
from surgery.atomic import check_destination
from surgery.checkpoint import make_random_checkpoint
from surgery.export import export_checkpoint
from surgery.io import load
from surgery.recipe import load_recipe
from surgery.summary import summarize
from surgery.verify import verify
from surgery.writer import save

__all__ = ["run_demo"]

PRESET = "tiny-paligemma2"
RECIPE = "paligemma2"
#: What the steps leave in the work folder, in order.
_PRODUCTS = ("checkpoint", "model.onnx", "out")


def _stage(message: str) -> None:
    print(f"\n== {message}", file=sys.stderr, flush=True)


def _kept(output: Path) -> str:
    """What the finished steps left in ``output``, for the closing message."""
    kept = [
        f"{name}/" if (output / name).is_dir() else name
        for name in _PRODUCTS
        if (output / name).exists()
    ]
    return ", ".join(kept) if kept else "nothing"


def _prepare(output: Path, force: bool) -> None:
    """Make ``output`` an empty folder; an existing one is refused, or replaced under ``force``."""
    check_destination(output, force=force)
    if output.is_dir() and not output.is_symlink():
        shutil.rmtree(output)
    elif output.exists() or output.is_symlink():
        output.unlink()
    output.mkdir()


def run_demo(output: str | Path, *, force: bool = False) -> int:
    """Run the demo into ``output``; return 0 when ONNX and PyTorch agree token for token."""
    output = Path(output)
    _prepare(output, force)
    step = "1/5 random checkpoint"
    try:
        _stage(f"{step} ({PRESET}) → {output / 'checkpoint'}")
        checkpoint = make_random_checkpoint(PRESET, output / "checkpoint")
        step = "2/5 export"
        _stage(f"{step} → {output / 'model.onnx'}")
        model = export_checkpoint(checkpoint, output / "model.onnx")
        step = f"3/5 surgery apply {RECIPE}"
        _stage(f"{step} → {output / 'out'}")
        recipe = load_recipe(RECIPE)
        bundle = load(model)
        recipe.layout.prepare(bundle)
        recipe.manager().run(bundle)
        save(bundle, output / "out", layout=recipe.layout)
        step = "4/5 inspect"
        _stage(step)
        print(summarize(load(output / "out")))
        ok = True
        step = "5/5 verify"
        for suffix in ("", "_fp16"):
            files = f"onnx/*{suffix}.onnx" if suffix else "onnx/*.onnx (fp32)"
            _stage(f"5/5 greedy generation of {files}: ONNX Runtime vs PyTorch generate()")
            same, report = verify(output / "out", checkpoint, suffix=suffix)
            print(report)
            ok &= same
    except BaseException:
        print(
            f"\ndemo: stopped in step {step}; what the earlier steps made is kept in {output}/: "
            f"{_kept(output)}",
            file=sys.stderr,
            flush=True,
        )
        raise
    if ok:
        print(
            f"\ndemo: greedy tokens identical to PyTorch (fp16 teacher-forced: its tokens or "
            f"near-ties of them); everything is in {output}/"
        )
        return 0
    print(
        f"\ndemo: greedy tokens DIFFERENT from PyTorch (see the tables above); "
        f"kept in {output}/: {_kept(output)}"
    )
    return 1
