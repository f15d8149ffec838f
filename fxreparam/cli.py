"""The ``fxreparam`` command line: ``demo``, ``optimize``, ``bench`` and ``passes``.

Every failure prints as one line on stderr (``fxreparam: error: <problem>: <fix>``) with exit code 2 for a
wrong argument and 1 for a failure of the model, the fold or the backend; ``--debug`` adds the traceback.
The model, weights and inputs are read by :mod:`fxreparam.cli_inputs`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import re
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import __version__, deploy, list_passes, optimize
from .cli_inputs import (
    DTYPES,
    MODEL_FORMS,
    CommandError,
    UsageError,
    check_arity,
    check_device,
    load_model,
    make_inputs,
    model_dtype,
    parse_device,
    parse_input,
    parse_shape,
)
from .errors import CaptureInputError, FxReparamError, VerificationError
from .registry import PassError, resolve
from .report import report
from .timing import Spread, spread_interleaved

__all__ = ["build_parser", "load_model", "main"]

log = logging.getLogger("fxreparam")

DESCRIPTION = """\
Fold structurally re-parameterized models (RepVGG, ACNet, DBB, MobileOne,
DiracNet, ...) into plain convolutions, check the result against the original,
and report what was folded and what was not."""

EPILOG = """\
examples:
  fxreparam demo --quiet
  fxreparam optimize timm:repvgg_a0 --input 1x3x224x224 --out repvgg_a0.pt2
  fxreparam optimize model.py:build --weights model.pt --input 1x3x64x64
  fxreparam optimize model.py:build --input 1x3x64x64 --input 1x10:int64
  fxreparam optimize torchvision:resnet18 --input 1x3x224x224 \\
      --backend aot_inductor --out r18.pt2
  fxreparam bench timm:mobileone_s0 --input 1x3x224x224 --backend inductor

Run 'fxreparam COMMAND --help' for the options of a command. Errors print as
one line (exit code 2 for a wrong argument, 1 for a failure); --debug shows
the Python traceback."""

MODEL_EPILOG = f"""\
MODEL is {MODEL_FORMS}
(a function returning the model). --weights reads a state dict (torch.load
with weights_only=True, or a .safetensors file). Each --input is one
positional input of forward: SHAPE or SHAPE:DTYPE, e.g. 1x3x224x224 or
1x128:int64; inputs are random (normal floats, integers 0 or 1), from --seed."""

OUT_EPILOG = """\
--out picks the format from its suffix: with --backend eager, .pt2 writes a
torch.export program and .onnx an ONNX model; with --backend aot_inductor,
.pt2 an AOTInductor package; with --backend tensorrt, .ep or .pt2 a TensorRT
program. Any other suffix is refused. fxreparam.load(path) reads either .pt2:
it tells them apart by their content."""

# What --out can write, by backend: {suffix: what it is}.
OUT_FORMATS = {
    "eager": {".pt2": "a torch.export program", ".onnx": "an ONNX model"},
    "inductor": {},
    "aot_inductor": {".pt2": "an AOTInductor package"},
    "tensorrt": {".ep": "a TensorRT program", ".pt2": "a TensorRT program"},
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (not the usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` and where help is, then exit with 2."""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive(text: str) -> int:
    """An integer of at least 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------- errors

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SYMBOL = re.compile(r"\b[su]\d+\b")  # torch's symbolic sizes (s77), meaningless to a user
_MAX_CHARS = 1500


def one_line(text: str) -> str:
    """A (possibly multi-line) message as one line: lines joined, symbolic sizes in words, length capped."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    joined = ""
    for line in lines:
        if joined:
            joined += " " if joined.endswith((":", ";", ".", ",")) else ". " if line.startswith("Remedy") else "; "
        joined += line
    joined = _SYMBOL.sub("<a dynamic size>", re.sub(r"\s+", " ", joined))
    if len(joined) > _MAX_CHARS:
        joined = joined[:_MAX_CHARS] + " ... (--debug shows the whole message)"
    return joined


def explain(err: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message for an error that ended a command."""
    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(err, CommandError):
        return err.code, one_line(str(err))
    text = one_line(str(err))
    if isinstance(err, CaptureInputError):
        return 2, f"{text} On the command line: --input SHAPE[:DTYPE] once per input of forward, --dtype, --device."
    if isinstance(err, (VerificationError, PassError)) and err.pass_name not in (None, "finalize"):
        return 1, f"{text} On the command line: --skip {err.pass_name}."
    if isinstance(err, FxReparamError):
        return 1, text
    if isinstance(err, torch.OutOfMemoryError):
        return 1, f"out of memory: {text.split('.')[0]}: use a smaller --input (batch) or another --device"
    if isinstance(err, OSError) and err.filename is not None:
        return 1, f"{err.strerror or type(err).__name__}: {err.filename}"
    return 1, (f"{type(err).__name__}: {text} (unexpected: run again with --debug for the traceback, and please "
               "report it)")


# ----------------------------------------------------------------------------------------------- commands


def _prepare(args: argparse.Namespace) -> tuple[nn.Module, tuple[torch.Tensor, ...], torch.dtype]:
    """The model (eval mode, on ``--device`` in ``--dtype``) and its example inputs; arguments checked first."""
    check_device(args.device)
    if args.skip:
        try:
            resolve(args.skip)
        except KeyError as err:
            raise UsageError(f"--skip: {err.args[0]}") from None
    log.info("loading %s ...", args.model)
    model = load_model(args.model, args.weights)
    check_arity(model, len(args.input))
    dtype = DTYPES[args.dtype] if args.dtype else model_dtype(model)
    model = model.to(device=args.device, dtype=dtype) if args.dtype else model.to(device=args.device)
    inputs = make_inputs(args.input, dtype, args.device, torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)  # verification draws its random inputs from the global generator
    return model, inputs, dtype


def _check_out(args: argparse.Namespace) -> None:
    """Refuse, before any work, an ``--out`` the backend cannot write or a folder that does not exist."""
    if args.backend == "tensorrt" and importlib.util.find_spec("torch_tensorrt") is None:
        raise UsageError("--backend tensorrt needs TensorRT and torch-tensorrt: pip install 'fxreparam[tensorrt]' "
                         "on a machine with an NVIDIA GPU")
    if not args.out:
        return
    if args.backend == "inductor":
        raise UsageError("--out with --backend inductor: a torch.compile module cannot be saved; save the folded "
                         "program (--backend eager) or build an AOTInductor package (--backend aot_inductor)")
    _check_suffix(args.out, args.backend)
    folder = Path(args.out).resolve().parent
    if not folder.is_dir():
        raise UsageError(f"--out {args.out}: the folder {str(folder)!r} does not exist")


def _check_suffix(out: str, backend: str) -> None:
    """Refuse an ``--out`` whose suffix ``backend`` cannot write (one line naming those it can), or ONNX without
    its exporter."""
    formats = OUT_FORMATS[backend]
    suffix = Path(out).suffix.lower()
    if suffix not in formats:
        can = " or ".join(f"{s} ({what})" for s, what in formats.items())
        raise UsageError(f"--out {out}: --backend {backend} writes {can}; give --out one of those suffixes")
    if suffix == ".onnx" and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        raise UsageError(f"--out {out}: writing ONNX needs onnx and onnxscript: pip install 'fxreparam[onnx]'")


def _save_eager(folded: nn.Module, out: str, inputs: tuple[torch.Tensor, ...]) -> str:
    """Write the folded model in the format ``out``'s suffix names; the line that says what was written."""
    if Path(out).suffix.lower() == ".onnx":
        log.info("exporting ONNX (torch.onnx, dynamo exporter) ...")
        path = deploy.export_onnx(folded, inputs, out)
        data = path.with_name(path.name + ".data")
        extra = f", its weights in {data.name} next to it: keep the two files together" if data.exists() else ""
        return f"saved: {path} (ONNX{extra}; run it with onnxruntime, or build a TensorRT engine with trtexec)"
    path = deploy.save(folded, out, inputs)
    return f"saved: {path} (a torch.export program; read it back with fxreparam.load)"


def _relative_difference(want: Any, got: Any) -> float:
    """The largest difference between two outputs' tensors, relative to the largest magnitude of ``want``."""
    pairs = list(zip(pytree.tree_leaves(want), pytree.tree_leaves(got)))
    worst, scale = 0.0, 0.0
    for a, b in pairs:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point() and a.numel():
            worst = max(worst, (a.double() - b.double()).abs().max().item())
            scale = max(scale, a.double().abs().max().item())
    return worst / scale if scale else worst


def _run_inductor(folded: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """Compile ``folded`` with Inductor (freezing), run it once and print how close it is to the eager module."""
    log.info("compiling the folded model with Inductor (freezing) and running it once ...")
    compiled = deploy.deploy(folded, "inductor", inputs, {})
    tick = time.perf_counter()
    with torch.no_grad():
        got = compiled(*inputs)
        want = folded(*inputs)
    print(f"inductor: compiled with freezing and ran in {time.perf_counter() - tick:.1f} s; largest difference to "
          f"the folded eager model {_relative_difference(want, got):.1e} (relative)")


def _optimize(args: argparse.Namespace) -> int:
    """Fold the model, print its report (for every backend), then hand it to the backend and save what it makes."""
    _check_out(args)
    model, inputs, _ = _prepare(args)
    folded = optimize(model, inputs, skip=args.skip, capture=args.capture)
    print(report(folded), flush=True)
    if args.backend == "eager":
        if args.out:
            print(_save_eager(folded, args.out, inputs))
    elif args.backend == "inductor":
        _run_inductor(folded, inputs)
    elif args.backend == "aot_inductor":
        log.info("compiling an AOTInductor package (C++ compilation: tens of seconds or more) ...")
        _, path = deploy.deploy(folded, "aot_inductor", inputs, {"path": args.out} if args.out else {})
        print(f"saved: {path} (an AOTInductor package; fxreparam.load(path) runs it)")
    else:
        log.info("building a TensorRT engine (%s) ...", args.precision)
        deploy.deploy(folded, "tensorrt", inputs, {"precision": args.precision, "path": args.out})
        print(f"saved: {args.out} (a TensorRT program; torch_tensorrt.load(path).module() runs it)" if args.out
              else "TensorRT engine built (--out saves it)")
    return 0


def _bench_variants(model: nn.Module, folded: nn.Module, inputs: tuple[torch.Tensor, ...], backend: str
                    ) -> dict[str, Any]:
    """What ``bench`` times, by ``"<model> <backend>"``: both models eager, and under Inductor (frozen) if asked."""
    variants: dict[str, Any] = {"original eager": model, "folded eager": folded}
    if backend == "inductor":
        log.info("compiling both with Inductor (weights frozen) ...")
        for label, m in (("original", model), ("folded", folded)):
            variants[f"{label} inductor"] = deploy.deploy(m, "inductor", inputs, {})
    return variants


def _spread_warnings(spreads: dict[str, Spread]) -> list[str]:
    """A warning per backend whose folded and original ``[min, max]`` ranges overlap: the ratio is then noise."""
    warnings = []
    for name, folded in spreads.items():
        backend = name.removeprefix("folded ")
        original = spreads.get(f"original {backend}")
        if name.startswith("folded ") and original is not None and folded.overlaps(original):
            warnings.append(f"warning: {backend}: the folded model's range ({folded.min:.2f}-{folded.max:.2f} ms) "
                            f"overlaps the original's ({original.min:.2f}-{original.max:.2f} ms), so its speedup "
                            "is within the run-to-run spread and means nothing; run on an idle machine or with a "
                            "larger --repeat")
    return warnings


def _bench(args: argparse.Namespace) -> int:
    """Time the original and the folded model (eager, optionally both under Inductor), taking turns run by run,
    and print min / median / max per variant, warning where the spread makes the speedup meaningless."""
    model, inputs, dtype = _prepare(args)
    folded = optimize(model, inputs, skip=args.skip, capture=args.capture)
    variants = _bench_variants(model, folded, inputs, args.backend)
    log.info("timing %d variants, taking turns run by run (%d runs each) ...", len(variants), args.repeat)
    spreads = spread_interleaved({name: (lambda _, fn=fn: fn(*inputs)) for name, fn in variants.items()},
                                 inputs[0], args.repeat)
    shapes = ", ".join(str(spec) for spec in args.input)
    threads = torch.get_num_threads()
    print(f"{args.model}, input {shapes}, {str(dtype).removeprefix('torch.')}, {args.device}, {threads} "
          f"thread{'s' if threads != 1 else ''}, {args.repeat} interleaved runs per variant after 3 warm-up runs")
    print(f"{'model':<10}{'backend':<10}{'min ms':>10}{'median ms':>11}{'max ms':>10}{'speedup':>10}")
    for name, spread in spreads.items():
        label, backend = name.split(" ")
        speedup = spreads[f"original {backend}"].median / spread.median
        print(f"{label:<10}{backend:<10}{spread.min:>10.2f}{spread.median:>11.2f}{spread.max:>10.2f}{speedup:>9.2f}x")
    print("speedup: the original's median over the variant's (the same backend)")
    for warning in _spread_warnings(spreads):
        print(warning)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Fold the built-in DiracNet and print the folded model (unless ``--quiet``) and the report."""
    from .demo import DiracNet
    from .testing import randomize_batch_norms

    torch.manual_seed(args.seed)
    model = randomize_batch_norms(DiracNet(depth=args.depth, width=args.width), seed=args.seed).eval()
    folded = optimize(model, torch.randn(*args.input))
    if not args.quiet:
        print(folded)
    print(report(folded))
    return 0


def _passes(args: argparse.Namespace) -> int:
    """List the registered passes, in the order they run, with what each folds."""
    width = max(len(p.name) for p in list_passes())
    for p in list_passes():
        print(f"{p.name.ljust(width)}  {p.description}")
    return 0


# ----------------------------------------------------------------------------------------------- parser


def _passes_list(text: str) -> list[str]:
    """``conv_bn,sequential`` as a list of pass names (argparse type of ``--skip``)."""
    return [name for name in text.split(",") if name]


def _add_common(parser: argparse.ArgumentParser,
                quiet: str = "no progress lines on stderr (the results still print)") -> None:
    """The options every command takes: how much to print (``quiet`` is the help text of ``--quiet``)."""
    parser.add_argument("--quiet", action="store_true", help=quiet)
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the Python traceback before the one-line message")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that load a model: which model, its weights, inputs, dtype and device."""
    parser.add_argument("model", metavar="MODEL", help=f"the model: {MODEL_FORMS}")
    parser.add_argument("--input", type=parse_input, action="append", required=True, metavar="SHAPE[:DTYPE]",
                        help="an example input of forward, e.g. 1x3x224x224 or 1x128:int64; repeat it once per "
                             "positional input, in order")
    parser.add_argument("--weights", metavar="FILE", help="a state dict to load into the model (torch.load with "
                        "weights_only=True, or a .safetensors file)")
    parser.add_argument("--dtype", choices=list(DTYPES),
                        help="convert the model and its float inputs to this dtype (default: the model's own)")
    parser.add_argument("--device", type=parse_device, default=torch.device("cpu"), metavar="DEVICE",
                        help="where to run: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--capture", default="auto", choices=["auto", "export", "symbolic_trace"],
                        help="how to capture the graph: auto (default: torch.export, else symbolic_trace) or one of "
                             "them only (symbolic_trace is fastest on very deep models)")
    parser.add_argument("--skip", type=_passes_list, action="extend", default=[], metavar="PASS[,PASS]",
                        help="passes not to run, comma-separated or repeated ('fxreparam passes' lists them)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random example and verification inputs (default 0)")
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="CPU threads torch uses (torch.set_num_threads; default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    """The ``fxreparam`` argument parser, with one subparser per command; every option has help text."""
    parser = _Parser(prog="fxreparam", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fxreparam {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    raw = argparse.RawDescriptionHelpFormatter

    demo = sub.add_parser("demo", formatter_class=raw,
                          help="fold the built-in DiracNet (training form) and print the result and the report",
                          description="Fold the built-in DiracNet-18-0.75 (its training form: Dirac weight\n"
                                      "parameterization and BatchNorm); print the folded model and the\n"
                                      "report.")
    demo.add_argument("--depth", type=_positive, default=18, help="conv and linear layers (default 18)")
    demo.add_argument("--width", type=float, default=0.75, help="width multiplier (default 0.75)")
    demo.add_argument("--input", type=parse_shape, default=(1, 3, 224, 224), metavar="SHAPE",
                      help="example input shape (default 1x3x224x224)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    _add_common(demo, quiet="print the report only: no folded model, no progress lines")
    demo.set_defaults(run=_demo)

    opt = sub.add_parser("optimize", formatter_class=raw,
                         help="fold a model, print the report, optionally compile or save it",
                         description="Fold MODEL, verify it against the original on the example inputs, print\n"
                                     "the report, and hand the folded model to --backend.",
                         epilog=MODEL_EPILOG + "\n" + OUT_EPILOG)
    _add_model_options(opt)
    opt.add_argument("--backend", default="eager", choices=["eager", "inductor", "aot_inductor", "tensorrt"],
                     help="what to make of the folded model: eager (default; --out saves a torch.export program), "
                          "inductor (torch.compile with freezing, run once as a check), aot_inductor (a compiled "
                          "package), tensorrt (needs torch-tensorrt)")
    opt.add_argument("--out", metavar="FILE", help="where to write the result, in the format its suffix names: "
                     ".pt2 (a torch.export program) or .onnx (ONNX) with eager, a .pt2 AOTInductor package "
                     "(aot_inductor; default: a new temporary folder), a .ep TensorRT program (tensorrt)")
    opt.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                     help="TensorRT precision (--backend tensorrt only; default fp32)")
    _add_common(opt)
    opt.set_defaults(run=_optimize)

    bench = sub.add_parser("bench", formatter_class=raw, help="time the original against the folded model",
                           description="Fold MODEL and time it against the original: the variants take turns run\n"
                                       "by run (--repeat runs each, after 3 warm-up runs), so a change in the\n"
                                       "machine's load falls on all alike; min / median / max per variant, and a\n"
                                       "warning where the folded model's [min, max] range overlaps the\n"
                                       "original's (the speedup is then within the noise).", epilog=MODEL_EPILOG)
    _add_model_options(bench)
    bench.add_argument("--backend", default="eager", choices=["eager", "inductor"],
                       help="eager (default), or also both models under torch.compile with Inductor (freezing)")
    bench.add_argument("--repeat", type=_positive, default=20, metavar="N", help="timed runs per model (default 20)")
    _add_common(bench)
    bench.set_defaults(run=_bench)

    passes = sub.add_parser("passes", help="list the registered passes in the order they run",
                            description="List the registered rewrite passes in the order they run.")
    _add_common(passes)
    passes.set_defaults(run=_passes)
    return parser


# ----------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def _held_stderr(debug: bool) -> Iterator[None]:
    """Hold what is written straight to ``sys.stderr`` (warnings; torch.export prints the partial graph of a model
    it cannot capture): written out after a command succeeds, dropped when it fails (unless ``debug``), so that
    a failure reads as its one-line message. The progress log keeps its own handle on the real stderr."""
    real, held = sys.stderr, io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        if debug:
            real.write(held.getvalue())
        raise
    real.write(held.getvalue())



def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and an exit code (2: wrong argument, 1: failure)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed as one line
        return done.code if isinstance(done.code, int) else 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fxreparam: %(message)s"))
    level, threads = log.level, torch.get_num_threads()
    log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        with _held_stderr(args.debug):
            return args.run(args)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    except BaseException as err:  # the one place every error becomes one line
        code, message = explain(err)
        if args.debug:
            traceback.print_exc()
        print(f"fxreparam: error: {message}", file=sys.stderr)
        return code
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
