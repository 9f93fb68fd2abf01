"""The ``onnxsal`` command: inspect and explain (and more, as sub-commands register)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console
from rich.markup import escape as esc
from rich.table import Table

from .export import EXPORTABLE
from .methods import check_options, get as get_method, methods as method_names
from .errors import ImageError, MethodError, ModelError, OnnxsalError, TargetError
from . import cli_options as O
from .preprocess import collect_images, output_names, parse_size
from .outputs import check_model_path, output_folder
from .values import numbers

if TYPE_CHECKING:
    import numpy as np

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Saliency maps for any ONNX image model, in ONNX Runtime.")
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 1000)


def show_progress(quiet: bool) -> bool:
    """Progress bars only on a terminal: elsewhere rich has nothing to redraw, and a transient bar
    would still end in a blank line before the summary or the one-line error."""
    return not quiet and err.is_terminal


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {esc(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise MethodError(f"--option takes key=value, not {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def method_options(methods: List[str], option: List[str]) -> dict[str, dict]:
    """-O key=value pairs, each given to every chosen method that takes that option (explain,
    sanity and evaluate alike); an option no chosen method takes is refused, not dropped."""
    opts = dict(_option(o) for o in option)
    specs = [get_method(m) for m in methods]
    unknown = [k for k in opts if not any(k in s.defaults for s in specs)]
    if unknown:
        raise MethodError(f"no chosen method takes option {', '.join(unknown)}")
    out = {}
    for s in specs:
        mine = {k: v for k, v in opts.items() if k in s.defaults}
        check_options(s, mine)
        out[s.name] = mine
    return out


def _feeds(feed: Optional[List[str]]) -> Optional[dict]:
    """--feed NAME=VALUE pairs; the values are parsed when the model's inputs are known (graph/fixed.py)."""
    if not feed:
        return None
    pairs = {}
    for text in feed:
        if "=" not in text:
            raise ModelError(f"--feed takes NAME=VALUE, not {text!r}")
        name, value = text.split("=", 1)
        pairs[name.strip()] = value.strip()
    return pairs


def _explainer(model: str, device: str, size: Optional[str], preprocess: Optional[str], mean: Optional[str],
               std: Optional[str], scale: Optional[float], bgr: Optional[bool], labels: Optional[str],
               batch_size: Optional[int], feed: Optional[List[str]] = None, head: Optional[str] = None):
    from .explainer import Explainer

    return Explainer(model, device, preprocess=preprocess, size=parse_size(size), labels=labels,
                     mean=numbers(mean, "--mean", ImageError), std=numbers(std, "--std", ImageError), scale=scale,
                     bgr=bgr, batch_size=batch_size, fixed_inputs=_feeds(feed), head=head)


@app.command()
def inspect(model: str = typer.Argument(..., help="ONNX model file"),
            size: Optional[str] = O.SIZE, feed: List[str] = O.FEED, head: Optional[str] = O.HEAD) -> None:
    """Show the model's input, outputs, logits, preprocessing and candidate layers."""
    from .graph.autodiff import spelled_ops
    from .model import load

    m = load(model, size=parse_size(size), fixed_inputs=_feeds(feed), head=head)
    inp = m.input
    out.print(f"[bold]{esc(os.path.basename(m.path))}[/]")
    precision = f"  {', '.join(m.lifted_from)} tensors, run in float32" if m.lifted_from else ""
    out.print(f"  input     {esc(inp.name)}  {inp.layout}  {inp.channels}x{inp.height}x{inp.width}{precision}")
    if m.read_as:
        out.print(f"            ({esc(m.read_as)})")
    if m.dense is not None:
        out.print(f"  output    {esc(m.output)}  ({m.dense.describe()})")
    elif m.detection is not None:
        out.print(f"  output    {esc(m.output)}  ({m.detection.describe()})")
    else:
        out.print(f"  output    {esc(m.output)}  ({m.num_classes} {'unit: binary classifier' if m.binary else 'classes'})")
    if m.output_note:
        out.print(f"            ({esc(m.output_note)})")
    act = f"before the final {m.activation}" if m.activation else "the output itself (no final activation found)"
    out.print(f"  logits    {esc(m.logits)}  ({act})")
    out.print(f"  preprocess {m.preprocess.describe() if m.preprocess else 'none in metadata (give --preprocess)'}")
    if m.quantisers:
        dynamic = "DynamicQuantizeLinear" in m.qoperator
        form = (f"{'dynamic quantisation' if dynamic else 'QOperator form'} ({', '.join(m.qoperator)}) run as QDQ"
                + (", each input's grid held" if dynamic else "")) if m.qoperator else "QDQ"
        out.print(f"  quantised {m.quantisers} QuantizeLinear on activations ({esc(form)}): gradients pass straight "
                  "through them within their range")
    if m.written:
        out.print(f"  written   {esc('; '.join(m.written))}")
    if m.expanded:
        out.print(f"  fused ops {esc(', '.join(m.expanded))} (ONNX Runtime's), run as the standard ops they fuse")
    if m.training:
        out.print(f"  training  {len(m.training)} nodes in training mode ({esc(', '.join(m.training[:4]))}"
                  f"{' ...' if len(m.training) > 4 else ''}): each image is scored as on its own, at batch 1")
    if m.one_image:
        out.print(f"  batch     one image at a time: the graph reads across its batch ({esc(m.one_image[0])})")
    spelled = spelled_ops(m.light)          # op types only: the weights need not be attached
    if m.functions or spelled:
        parts = ([f"the model's own {', '.join(m.functions)} written out"] if m.functions else []) + \
                ([f"{', '.join(spelled)} differentiated through their ONNX function bodies"] if spelled else [])
        out.print(f"  functions {esc('; '.join(parts))}")
    if m.labels:
        shown = ", ".join(m.labels[:10]) + (" ..." if len(m.labels) > 10 else "")
        out.print(f"  labels    {esc(shown)}")
    refused = _runtime_refusal(m)
    if refused:
        out.print(f"  runtime   no method can run it: {esc(refused)}")
    else:
        out.print(f"  gradients {esc(_gradient_state(m))}")
    tokens = m.token_layers()
    if tokens:
        out.print("  token layers (transformer; pass one with --layer): " + ", ".join(
            f"{esc(t.tensor)} ({t.shape[0]} x {t.shape[1]}x{t.shape[2]} grid{f', {t.prefix} leading' if t.prefix else ''})"
            for t in tokens))
    if not m.layers:
        out.print("  layers    none: CAM methods need --layer" + (" (a token layer above)" if tokens else
                  "; use occlusion, rise or a gradient method"))
        return
    table = Table(title="candidate layers (CAM methods)", show_lines=False)
    for col in ("", "tensor", "node", "op", "channels x h x w"):
        table.add_column(col)
    default = m.default_layer
    for layer in m.layers:
        mark = "*" if layer is default else ""
        table.add_row(mark, esc(layer.tensor), esc(layer.node), layer.op_type, "x".join(map(str, layer.shape)))
    out.print(table)
    out.print(f"  default layer (*): {esc(default.tensor)}")


def _runtime_refusal(m) -> Optional[str]:
    """ONNX Runtime's refusal to load the model's graph (a pool whose pad is as large as its kernel
    and cannot move into a Pad node), or None: every method, gradient-free ones too, runs it."""
    from .runtime import Runtime

    try:
        Runtime("cpu").session("inspect", lambda: m.light)
    except OnnxsalError as exc:
        return str(exc)
    return None


def _gradient_state(m) -> str:
    """Whether the gradient graph builds for the default score, or why not: what a user needs to
    know before picking a gradient or a CAM method."""
    from .engine import gradient_graph

    try:
        g = gradient_graph(m.light, m.score_tensor("logit"), [m.input.name])
    except OnnxsalError as exc:
        return f"none: {exc}"
    except Exception as exc:          # inspect still shows the rest of what it found
        return f"none: building it failed ({type(exc).__name__}: {exc})"
    return f"the gradient graph builds ({len(g.graph.node)} nodes)"


@app.command()
def explain(
    model: str = typer.Argument(..., help="ONNX model file"),
    images: List[str] = typer.Argument(..., help="image files (PNG, JPEG, BMP, TIFF, WebP), preprocessed .npy, "
                                              "or folders of them"),
    method: List[str] = typer.Option(["gradcam"], "--method", "-m", help="method name, repeatable: " + "; ".join(method_names())),
    target: List[str] = typer.Option([], "--target", "-t", help="class index or label, repeatable (default: top-1)"),
    top_k: int = typer.Option(1, "--top-k", "-k", help="explain the K highest-scoring classes"),
    target_weights: Optional[str] = typer.Option(None, "--target-weights",
                                                 help=".npy of weights shaped like one output row: score = sum(w * output)"),
    like: Optional[str] = O.LIKE,
    layer: List[str] = O.LAYERS,
    out_dir: str = O.OUT_DIR,
    score: str = O.SCORE,
    region: str = O.REGION,
    smooth: Optional[float] = typer.Option(None, help="Gaussian sigma (pixels) applied to the map before normalising"),
    option: List[str] = O.OPTION,
    preprocess: Optional[str] = O.PREPROCESS,
    mean: Optional[str] = O.MEAN,
    std: Optional[str] = O.STD,
    scale: Optional[float] = O.SCALE,
    bgr: Optional[bool] = O.BGR,
    size: Optional[str] = O.SIZE,
    labels: Optional[str] = O.LABELS,
    device: str = O.DEVICE,
    batch_size: Optional[int] = O.BATCH_SIZE,
    feed: List[str] = O.FEED,
    head: Optional[str] = O.HEAD,
    cmap: str = typer.Option("jet", help="matplotlib colormap"),
    alpha: float = typer.Option(0.5, help="overlay opacity"),
    quiet: bool = O.QUIET,
) -> None:
    """Explain images: writes <image>.<method>.png / .npy and <image>.json into --out."""
    from rich.progress import Progress

    from .render import check_style

    check_style(cmap, alpha)                  # before any work: the overlays come last
    if top_k > 1 and (target or target_weights is not None):
        raise TargetError(f"give --target (or --target-weights) or --top-k {top_k}, not both: --top-k picks the "
                          "classes itself")
    specs = [get_method(m) for m in method]
    per_method = method_options([s.name for s in specs], option)
    chosen = O.one_or_many(layer)
    if "-" in images:                       # an encoded image on standard input, as `curl ... |` gives it
        if images.count("-") > 1:
            raise ImageError("standard input ('-') holds one image; give it once")
        if sys.stdin is None or sys.stdin.isatty():
            raise ImageError("'-' reads an image from standard input, but nothing is piped to it")
    images = [found for item in images for found in (["-"] if item == "-" else collect_images([item]))]
    with output_folder(out_dir):
        ex = _explainer(model, device, size, preprocess, mean, std, scale, bgr, labels, batch_size, feed, head)
        targets = target or None
        if target_weights is not None:
            if target:
                raise TargetError("give --target or --target-weights, not both")
            targets = _weights(target_weights)
        if like is not None:
            if target_weights is not None:
                raise TargetError("give --like or --target-weights, not both")
            ex = ex.like(_reference(like))
        results = []
        with Progress(console=err, transient=True, disable=not show_progress(quiet)) as bar:
            task = bar.add_task("explaining", total=len(images) * len(specs))
            rows = bar.add_task("  batches", total=None)

            def batches(done: int, total: int) -> None:   # long runs (RISE, Score-CAM, IG) report each batch
                bar.update(rows, completed=done, total=total)

            names = output_names([i for i in images if i != "-"])
            for image in images:
                prepared = ex.prepare(sys.stdin.buffer.read() if image == "-" else image)
                prepared.name = "stdin" if image == "-" else names[image]
                for spec in specs:
                    bar.update(task, description=f"{prepared.name}: {spec.name}")
                    kw = per_method[spec.name]
                    res = ex.explain(prepared, spec.name, targets, top_k=top_k, layer=chosen, score=score, smooth=smooth,
                                     region=region, progress=batches, **kw)
                    results.append(res)
                    bar.advance(task)
        # write everything into a scratch folder first, so a failure leaves nothing half-written in --out
        scratch = tempfile.mkdtemp(prefix=".onnxsal-", dir=out_dir)
        try:
            written = []
            for res in results:
                summary = os.path.join(out_dir, res.name + ".json")
                if os.path.exists(summary) and not os.path.exists(os.path.join(scratch, res.name + ".json")):
                    shutil.copy(summary, scratch)     # an earlier run's methods stay in the summary
                written += res.save(scratch, cmap=cmap, alpha=alpha)
            for path in dict.fromkeys(written):
                shutil.move(path, os.path.join(out_dir, os.path.basename(path)))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if quiet:
        return
    out.print(f"device: {ex.device}")
    noted: set = set()
    aliases = {t: k for k, t in ex.model.layer_aliases.items()}
    for res in results:
        tgt = ", ".join(f"{t.label} ({t.index})" for t in res.targets)
        where = ", ".join(f"{aliases[t]} ({t})" if t in aliases else t
                          for t in ([res.layer] if isinstance(res.layer, str) else res.layer or []))
        where = f" at {where}" if where else ""
        out.print(esc(f"{res.name}: {res.method}{where} -> {tgt}  [{res.seconds:.2f}s]  "
                      f"{os.path.join(out_dir, res.name + '.' + res.method + '.png')}"))
        for note in res.notes:
            if (res.name, note) not in noted:
                noted.add((res.name, note))
                out.print(f"  note: {esc(note)}", style="dim")


def _reference(path: str):
    """``--like``: an image file, or a .npy holding an output vector (1-D) or a preprocessed input."""
    if not path.lower().endswith(".npy"):
        return path
    from .preprocess import read_npy

    a = read_npy(path, "reference", TargetError)
    return a.reshape(-1) if a.ndim <= 2 and a.dtype.kind == "f" and (a.ndim == 1 or a.shape[0] == 1) else path


def _weights(path: str) -> "np.ndarray":
    import numpy as np

    from .preprocess import read_npy

    w = read_npy(path, "target weights", TargetError)
    if not np.issubdtype(w.dtype, np.number) or w.size == 0:
        raise TargetError(f"target weights {path} hold no numbers")
    return np.asarray(w, np.float32)


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="ONNX model file"),
    method: str = typer.Option("gradcam", "--method", "-m", help=", ".join(EXPORTABLE)),
    output: str = typer.Option(..., "--output", "-o", help="where to write the standalone explainer graph"),
    layer: Optional[str] = O.LAYER,
    size: Optional[str] = O.SIZE,
    n_samples: Optional[int] = typer.Option(None, help="smoothgrad: noisy copies per image (default 20)"),
    noise_level: Optional[float] = typer.Option(None, help="smoothgrad: noise sd as a fraction of the input range "
                                                "(default 0.15)"),
    steps: Optional[int] = typer.Option(None, help="ig, layerig: Gauss-Legendre steps from a zero baseline (default 32)"),
    feed: List[str] = O.FEED,
    head: Optional[str] = O.HEAD,
    region: str = O.REGION,
    like: Optional[str] = typer.Option(None, "--like", help="reference image or .npy of its output vector, held in "
                                       "the graph; or 'input': the graph takes it as a third input, reference (1 or N, D)"),
    preprocess: Optional[str] = O.PREPROCESS,
) -> None:
    """Write one ONNX graph: inputs (image, target int64[N]) -> outputs (logits, map [N, H, W] in [0, 1]).

    With --like, the score is the similarity to a reference (target 1: similarity, 0:
    dissimilarity), held in the graph as a constant or, with --like input, fed at run time;
    --preprocess says how to read a reference image."""
    from .export import export
    from .model import load, write_proto

    name = method.lower()
    unused = [flag for flag, value, users in (("--n-samples", n_samples, ("smoothgrad",)),
                                              ("--noise-level", noise_level, ("smoothgrad",)),
                                              ("--steps", steps, ("ig", "layerig"))) if value is not None and name not in users]
    if unused:                                  # before any work: the graph would silently leave them out
        raise MethodError(f"{' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by -m {method}")
    check_model_path(output)                    # before the work: a large model's graph takes a while
    m = load(model, size=parse_size(size), fixed_inputs=_feeds(feed), head=head)
    width = m.num_classes           # an output row's values: the width of a reference vector
    if like is not None:
        import numpy as np

        from .explainer import Explainer

        held = np.ones(width, np.float32) if like == "input" else _reference(like)   # "input": fed at run time
        m = Explainer(m, "cpu", preprocess=preprocess).like(held).model
    elif preprocess is not None:
        raise ImageError("--preprocess reads a --like reference image; the exported graph takes preprocessed tensors")
    given = {k: v for k, v in (("n_samples", n_samples), ("noise_level", noise_level), ("steps", steps)) if v is not None}
    graph = export(m, method, layer, region=region, reference_input=like == "input", **given)
    write_proto(graph, output)
    inp = graph.graph.input[0]
    extra = f" + reference (1 or N, {width})" if like == "input" else ""
    out.print(f"wrote {esc(output)}: inputs {esc(inp.name)} + target (int64 class per image, or one for all){extra} "
              f"-> logits, map ({method})", soft_wrap=True)


@app.command("methods")
def list_methods() -> None:
    """List the available methods and their options."""
    table = Table()
    for col in ("method", "family", "runs", "options", "what it computes"):
        table.add_column(col)
    for name in method_names():
        spec = get_method(name)
        opts = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        runs = "forward only" if spec.gradient_free else "gradients"   # what a model without a gradient graph still runs
        table.add_row(name, spec.family, runs, opts, spec.summary)
    out.print(table)


def _register_commands() -> None:
    """Commands that live beside their subject register themselves; none imports a framework at load time."""
    from .evaluate.commands import register as register_trust
    register_trust(app)
    try:
        from converters.commands import register as register_convert
    except ModuleNotFoundError as exc:  # the engine installed without the converters package
        if exc.name not in ("converters", "converters.commands"):
            raise
    else:
        register_convert(app)


_register_commands()


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: every onnxsal error becomes one line on stderr and a non-zero exit."""
    try:
        app(args=argv, standalone_mode=False)
    except OnnxsalError as exc:
        err.print(f"[bold red]error:[/] {esc(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except OSError as exc:  # a file a command writes (a figure, a table) that the system refuses
        where = f": {exc.filename}" if exc.filename else ""
        err.print(f"[bold red]error:[/] {esc(str(exc.strerror or exc))}{esc(str(where))}", highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except Exception as exc:  # click usage errors and anything unexpected: still one line
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):  # click usage errors
            err.print(f"[bold red]error:[/] {esc(exc.format_message())}", highlight=False, soft_wrap=True)
            return exc.exit_code
        err.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {esc(str(exc))}", highlight=False, soft_wrap=True)
        return 3
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
