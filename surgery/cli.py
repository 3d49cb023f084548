"""The ``surgery`` command line.

Exit codes follow pre-commit's ``error_handler``: 0 success; 1 a problem with the input that the
user can fix (one clear line on stderr, no traceback); 3 a bug (traceback written to a log file,
or printed with ``--debug``); 130 interrupted with Ctrl-C; 143 terminated with SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import surgery.builtins  # noqa: F401  (recipes and `surgery passes` name the built-ins)
from surgery.atomic import environment_error
from surgery.errors import SurgeryError

if typing.TYPE_CHECKING:
    from surgery.bundle import Bundle

__all__ = ["main"]

_EPILOG = """\
examples:
  surgery demo                                  tiny random PaliGemma 2, end to end
  surgery make-random tiny-paligemma2 -o ckpt   a random checkpoint to play with
  surgery export ckpt -o model.onnx             one monolithic ONNX graph
  surgery apply cleanup model.onnx -o out --time-passes --dump-dir dumps
  surgery inspect out/model.onnx
  surgery passes optimize                       what a pass does and its options
"""


def _apply_inputs(args: argparse.Namespace, recipe: str, bundle: Bundle) -> list[Path]:
    """Every path `apply` reads: the recipe, the model(s), their data files, the checkpoint."""
    import onnx_ir as ir

    from surgery.constants import CHECKPOINT_METADATA_KEY
    from surgery.tensors import iter_tensors

    paths = [Path(recipe), Path(args.model)]
    if args.checkpoint:
        paths.append(Path(args.checkpoint))
    model_dir = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
    for model in bundle.values():
        paths += [Path(t.path) for _, t in iter_tensors(model) if isinstance(t, ir.ExternalTensor)]
        if CHECKPOINT_METADATA_KEY in model.metadata_props:
            recorded = model.metadata_props[CHECKPOINT_METADATA_KEY]
            paths += [Path(recorded), model_dir / recorded]
    return paths


def _cmd_apply(args: argparse.Namespace) -> int:
    from surgery.atomic import check_destination, check_folder_creatable
    from surgery.instruments import DumpAfterPass, ProgressLog, TimePasses, VerifyEach
    from surgery.io import load
    from surgery.manager import Instrument
    from surgery.recipe import load_recipe
    from surgery.transformersjs import TransformersJsLayout
    from surgery.writer import save

    recipe = load_recipe(args.recipe, imports="allow" if args.allow_imports else "refuse")
    if args.print:
        print(recipe.to_yaml(), end="")
    out = check_destination(args.output, force=args.force)
    if args.dump_dir:
        check_folder_creatable(args.dump_dir, what="--dump-dir")
    bundle = load(args.model)
    inputs = _apply_inputs(args, recipe.source, bundle)
    check_destination(out, force=args.force, inputs=inputs)
    instruments: list[Instrument] = []
    if not args.quiet:
        instruments.append(ProgressLog(len(recipe.steps)))
    if args.verify_each:
        instruments.append(VerifyEach())
    if args.dump_dir:
        instruments.append(
            DumpAfterPass(
                args.dump_dir,
                only_changed=args.dump_changed,
                on_failure=args.dump_on_failure,
                replace=args.force,
            )
        )
    if args.time_passes:
        instruments.append(TimePasses())
    layout = recipe.layout
    if args.checkpoint:
        if not isinstance(layout, TransformersJsLayout):
            raise SurgeryError(
                f"--checkpoint: only the transformers.js layout uses it; {recipe.source} "
                f"writes the '{layout.name}' layout"
            )
        layout.checkpoint = Path(args.checkpoint)
    layout.prepare(bundle)  # everything checkable from files and configs, before the first pass
    recipe.manager(instruments).run(bundle)
    save(bundle, out, layout=layout, force=args.force, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from surgery.registry import all_passes, get_pass

    if args.name:
        print(get_pass(args.name).help())
        return 0
    passes = all_passes()
    width = max(len(name) for name in passes)
    for name, cls in passes.items():
        print(f"{name.ljust(width)}  {cls.summary}")
    print("\n`surgery passes NAME` shows a pass's documentation and options.")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from surgery.recipe import load_recipe

    recipe = load_recipe(args.recipe, imports="skip")  # validating never runs a recipe's code
    if args.print:
        print(recipe.to_yaml(), end="")
    skipped = recipe.not_imported()
    note = f"; not imported, options unchecked: {', '.join(skipped)}" if skipped else ""
    count = len(recipe.steps)
    print(f"{recipe.source}: ok, {count} pass{'' if count == 1 else 'es'}{note}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from surgery.io import load
    from surgery.summary import summarize

    print(summarize(load(args.model)))
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    import errno

    import netron

    from surgery.io import load_model

    load_model(args.model)  # validate first: a clear error instead of a blank page
    try:
        address = netron.start(str(args.model), address=("127.0.0.1", args.port), browse=False)
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
            raise
        raise SurgeryError(
            f"--port {args.port}: cannot serve on 127.0.0.1:{args.port} ({exc.strerror}); "
            "choose another port"
        ) from None
    print(f"serving {args.model} at http://{address[0]}:{address[1]}  (Ctrl-C to stop)", flush=True)
    netron.wait()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from surgery.export import export_checkpoint
    from surgery.instruments import DumpAfterPass, TimePasses
    from surgery.manager import Instrument

    instruments: list[Instrument] = []
    if args.dump_dir:
        instruments.append(DumpAfterPass(args.dump_dir))
    if args.time_passes:
        instruments.append(TimePasses())
    path = export_checkpoint(
        args.checkpoint,
        args.output,
        force=args.force,
        progress=not args.quiet,
        instruments=instruments,
    )
    print(f"wrote {path}")
    return 0


def _cmd_make_random(args: argparse.Namespace) -> int:
    from surgery.checkpoint import make_random_checkpoint

    path = make_random_checkpoint(
        args.config, args.output, seed=args.seed, force=args.force, progress=not args.quiet
    )
    print(f"wrote {path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from surgery.verify import FP16_SUFFIXES, QUANTIZED_SUFFIXES, verify

    ok, report = verify(
        Path(args.target),
        Path(args.checkpoint),
        prompts=args.prompt,
        images=[Path(p) for p in args.image] if args.image else None,
        max_new_tokens=args.max_new_tokens,
        suffix=args.suffix,
    )
    print(report)
    if args.suffix in QUANTIZED_SUFFIXES:  # measured, not pass/fail: near-ties flip
        return 0
    if args.suffix in FP16_SUFFIXES:  # near-ties flip under fp16 rounding: judged teacher-forced
        if not ok:
            raise SurgeryError(
                f"{args.target}: {args.suffix} top-1 differs from PyTorch beyond a near-tie "
                "(see the report above)"
            )
        print(f"{args.suffix}: PyTorch generate()'s tokens or near-ties of them, teacher-forced")
        return 0
    if not ok:
        raise SurgeryError(
            f"{args.target}: greedy tokens differ from PyTorch (see the table above)"
        )
    print("greedy tokens identical to PyTorch generate()")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from surgery.demo import run_demo

    return run_demo(args.output, force=args.force)


def _preset_names() -> list[str]:
    from surgery.checkpoint import PRESETS

    return list(PRESETS)


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 like every other user error (argparse's default is 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="surgery",
        description="Export Hugging Face vision-language models to ONNX once, then reshape the "
        "graph with named passes (split, rename-io, fp16, split-large-tensors, ...; "
        "`surgery passes` lists them).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="print tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("apply", _cmd_apply, "run a recipe's passes on a model and write the result")
    p.add_argument(
        "recipe", help="recipe YAML file, or the name of a shipped recipe (e.g. cleanup)"
    )
    p.add_argument("model", help=".onnx file (its external data beside it), or a folder of them")
    p.add_argument("-o", "--output", required=True, help="output folder (must not exist)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output folder and an earlier run's dumps in --dump-dir",
    )
    p.add_argument("--dump-dir", help="write every part after every pass to DIR/NN-<pass>/")
    p.add_argument(
        "--dump-changed", action="store_true", help="dump only after passes that changed something"
    )
    p.add_argument(
        "--dump-on-failure",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --dump-dir, write a failing pass's input to DIR/NN-<pass>-failed-input/ "
        "(default: on)",
    )
    p.add_argument(
        "--time-passes",
        action="store_true",
        help="print wall time, peak memory and op changes per pass",
    )
    p.add_argument(
        "--verify-each", action="store_true", help="run the ONNX checker after every pass"
    )
    p.add_argument("--print", action="store_true", help="print the resolved recipe first")
    p.add_argument(
        "--checkpoint",
        help="Hugging Face checkpoint folder whose configs and tokenizer the transformers.js "
        "layout copies (default: the one recorded by `surgery export`)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--allow-imports",
        action="store_true",
        help="import the modules named by the recipe's `use:` entries, i.e. run their code "
        "(refused otherwise)",
    )

    p = command("passes", _cmd_passes, "list the available passes, or document one")
    p.add_argument("name", nargs="?", help="a pass name")

    p = command("validate", _cmd_validate, "check a recipe without running it")
    p.add_argument("recipe", help="recipe YAML file or shipped recipe name")
    p.add_argument("--print", action="store_true", help="print the resolved recipe")

    p = command(
        "inspect", _cmd_inspect, "inputs, outputs, ops, parameters and data files of a model"
    )
    p.add_argument("model", help=".onnx file or a folder of them")

    p = command("view", _cmd_view, "open a model in Netron, served on 127.0.0.1")
    p.add_argument("model", help=".onnx file")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")

    p = command(
        "export", _cmd_export, "export a PaliGemma / PaliGemma 2 checkpoint to one ONNX graph"
    )
    p.add_argument("checkpoint", help="local Hugging Face checkpoint folder")
    p.add_argument(
        "-o", "--output", required=True, help="the .onnx file to write (data file beside it)"
    )
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--time-passes",
        action="store_true",
        help="print wall time, peak memory and op changes of the post-processing passes",
    )
    p.add_argument(
        "--dump-dir", help="write the graph after each post-processing pass to DIR/NN-<pass>/"
    )

    p = command(
        "make-random", _cmd_make_random, "write a random PaliGemma checkpoint (for tests and demos)"
    )
    p.add_argument(
        "config",
        help=f"a preset ({', '.join(_preset_names())}) or a PaliGemma config.json",
    )
    p.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    p = command(
        "verify",
        _cmd_verify,
        "compare greedy generation of ONNX parts (or a whole exported graph) with PyTorch",
    )
    p.add_argument("target", help="a Transformers.js output folder, or an exported .onnx file")
    p.add_argument("--checkpoint", required=True, help="the Hugging Face checkpoint folder")
    p.add_argument(
        "--prompt",
        action="append",
        help="a prompt (repeat for a batch; default: two built-in ones)",
    )
    p.add_argument(
        "--image", action="append", help="an image file (one, or one per prompt; default: random)"
    )
    p.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (default 20)")
    p.add_argument(
        "--suffix",
        default="",
        help="file suffix of the parts, e.g. _fp16 (default: fp32); _fp16 is run teacher-forced "
        "along PyTorch's path (every differing top-1 must be a near-tie); quantized ones (_q4 "
        "...) are compared teacher-forced with fp32: top-1 agreement and logits cosine",
    )

    p = command(
        "demo", _cmd_demo, "build a tiny random PaliGemma 2, export it, run the flagship recipe"
    )
    p.add_argument(
        "-o", "--output", default="surgery-demo", help="work folder (default surgery-demo)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing work folder")
    return parser


def _report_bug(exc: BaseException, debug: bool) -> None:
    text = "".join(traceback.format_exception(exc))
    if debug:
        sys.stderr.write(text)
        print(f"surgery: internal error: {exc}", file=sys.stderr)
        return
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with tempfile.NamedTemporaryFile(
        "w", prefix=f"surgery-crash-{stamp}-", suffix=".log", delete=False
    ) as log:
        log.write(text)
    print(
        f"surgery: internal error: {type(exc).__name__}: {exc}\n"
        f"  this is a bug; the traceback is in {log.name} (or rerun with --debug)",
        file=sys.stderr,
    )


#: The optional extra each command needs (surgery.extras checks it before the command runs).
_EXTRA_FOR = {
    "view": "view",
    "export": "export",
    "make-random": "export",
    "verify": "export",
    "demo": "export",
}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that cleanup runs as for Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _interrupted(exc: KeyboardInterrupt) -> int:
    terminated = isinstance(exc, _Terminated)
    print(f"surgery: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return 143 if terminated else 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    # First, before any heavy import: SIGTERM then ends a run as Ctrl-C does (cleanup runs).
    # An inherited "ignore" (nohup) is kept; the previous handler is restored for callers.
    install = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    )
    if install:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(argv)
    except KeyboardInterrupt as exc:  # while parsing arguments
        return _interrupted(exc)
    finally:
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `surgery` asks what it can do: help, exit 0 (as pip)
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        extra = _EXTRA_FOR.get(args.command)
        if extra:
            from surgery.extras import require_extra

            require_extra(extra, f"surgery {args.command}")
        return int(args.func(args))
    except SurgeryError as exc:
        print(f"surgery: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except OSError as exc:
        error = environment_error(exc)
        if error is None:
            _report_bug(exc, args.debug)
            return 3
        print(f"surgery: error: {error}", file=sys.stderr)
        return 1
    except Exception as exc:
        _report_bug(exc, args.debug)
        return 3


if __name__ == "__main__":
    # `python -m` puts the working directory first on sys.path; drop it as `python -P` does, so
    # that a recipe's `use:` imports what is installed or on PYTHONPATH, never a file that
    # happens to sit in the current folder (the `surgery` script never had it).
    if sys.path and sys.path[0] == os.getcwd() and not getattr(sys.flags, "safe_path", False):
        del sys.path[0]
    sys.exit(main())
