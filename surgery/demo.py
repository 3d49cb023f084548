"""``surgery demo``: the whole path on a tiny random PaliGemma 2, with no download.

make a random checkpoint → export one ONNX graph → run the flagship recipe (the Transformers.js
folder, fp32 and fp16) → inspect the result → compare greedy generation with PyTorch. Everything is built in a temporary folder beside the
work folder and moved into place at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import surgery.builtins  # noqa: F401  (the recipe names built-in passes and layouts)
from surgery.atomic import atomic_dir
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


def _stage(message: str) -> None:
    print(f"\n== {message}", file=sys.stderr, flush=True)


def run_demo(output: str | Path, *, force: bool = False) -> int:
    """Run the demo into ``output``; return 0 when ONNX and PyTorch agree token for token."""
    output = Path(output)
    with atomic_dir(output, force=force) as work:
        _stage(f"1/5 random checkpoint ({PRESET}) → {output / 'checkpoint'}")
        checkpoint = make_random_checkpoint(PRESET, work / "checkpoint")
        _stage(f"2/5 export → {output / 'model.onnx'}")
        model = export_checkpoint(checkpoint, work / "model.onnx")
        _stage(f"3/5 surgery apply {RECIPE} → {output / 'out'}")
        recipe = load_recipe(RECIPE)
        bundle = load(model)
        recipe.manager().run(bundle)
        save(bundle, work / "out", layout=recipe.layout)
        _stage("4/5 inspect")
        print(summarize(load(work / "out")))
        ok = True
        for suffix in ("", "_fp16"):
            files = f"onnx/*{suffix}.onnx" if suffix else "onnx/*.onnx (fp32)"
            _stage(f"5/5 greedy generation of {files}: ONNX Runtime vs PyTorch generate()")
            same, report = verify(work / "out", checkpoint, suffix=suffix)
            print(report)
            ok &= same
    verdict = "identical to" if ok else "DIFFERENT from"
    print(f"\ndemo: greedy tokens {verdict} PyTorch; everything is in {output}/")
    return 0 if ok else 1
