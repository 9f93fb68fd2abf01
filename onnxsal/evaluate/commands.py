"""CLI commands `sanity` and `evaluate` (registered on the main app by onnxsal.cli).

Both print rich tables to stdout, show progress on stderr, and write CSV (one
row per measurement, for scripts), JSON (means, spreads, settings) and a figure
into ``--out``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from typing import Iterator, List, Optional

import typer
from rich.markup import escape as esc

from onnxsal import cli_options as O

from ..errors import MethodError, MissingFileError, OutputError
from ..preprocess import collect_images

SANITY_DEFAULT = ["gradcam", "saliency", "guidedbackprop"]


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("sanity")(sanity)
    app.command("evaluate")(evaluate)


# shared -------------------------------------------------------------------------------------

def _method_names(method: List[str]) -> list[str]:
    from ..methods import get as get_method, methods as method_names

    if any(m.lower() == "all" for m in method):
        return method_names()
    return list(dict.fromkeys(get_method(m).name for m in method))


def _progress(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..cli import err, show_progress

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True, disable=not show_progress(quiet))


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """A table or figure the system refuses to write (a full disk) names its file, as an OutputError."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {path!r}: {exc.strerror or exc}") from exc


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _pm(mean: float, std: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# sanity -------------------------------------------------------------------------------------

def sanity(
    model: str = typer.Argument(..., help="ONNX model file"),
    images: List[str] = typer.Argument(..., help="image files or folders (a few images suffice)"),
    method: List[str] = typer.Option(SANITY_DEFAULT, "--method", "-m", help="method name, repeatable, or 'all'"),
    mode: str = typer.Option("both", help="cascading, independent or both"),
    permuted: Optional[str] = typer.Option(None, "--permuted", help="the same model trained on permuted labels "
                                           "(data randomisation test), e.g. models/demo/demo_shapes_permuted.onnx"),
    threshold: float = typer.Option(0.5, help="a method passes when the mean Spearman rank correlation of its "
                                    "absolute map with the original falls below this before randomisation "
                                    "reaches the lower half of the layers"),
    seed: int = typer.Option(0, help="seed of the random weights"),
    max_steps: int = typer.Option(16, help="deep models: randomise layers in at most this many blocks"),
    target: Optional[str] = O.TARGET,
    layer: List[str] = O.LAYERS,
    score: str = O.SCORE,
    region: str = O.REGION,
    like: Optional[str] = O.LIKE,
    option: List[str] = O.OPTION,
    out_dir: str = O.OUT_DIR,
    cmap: str = typer.Option("gray", help="matplotlib colormap of the figure"),
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
    quiet: bool = O.QUIET,
) -> None:
    """Randomisation sanity check (Adebayo et al. 2018): do the maps change with the weights?

    Writes sanity.csv, sanity.json and sanity_<image>.png (one row per method: the original map,
    then the map after each cascading step) into --out.
    """
    from ..cli import _explainer, _feeds, _reference, method_options, out
    from ..outputs import output_folder
    from ..render import check_style
    from .sanity import figure, sanity_check

    check_style(cmap)
    modes = {"both": ("cascading", "independent"), "cascading": ("cascading",), "independent": ("independent",)}
    if mode not in modes:
        raise MethodError(f"--mode must be cascading, independent or both, not {mode!r}")
    methods = _method_names(method)
    options = method_options(methods, option)
    files = collect_images(images)
    with output_folder(out_dir):
        ex = _explainer(model, device, size, preprocess, mean, std, scale, bgr, labels, batch_size, feed, head)
        perm = None
        if permuted:
            from ..explainer import Explainer

            perm = Explainer(permuted, ex.device, preprocess=ex.model.preprocess, labels=ex.model.labels,
                             batch_size=batch_size, fixed_inputs=_feeds(feed), head=head)
            if perm.model.input.size != ex.model.input.size or perm.model.num_classes != ex.model.num_classes:
                raise MethodError(f"{permuted} does not match the model (input {perm.model.input.size}, "
                                  f"{perm.model.num_classes} classes): the data randomisation test needs the same "
                                  "architecture")
        with _progress(quiet) as bar:
            task = bar.add_task("sanity", total=None)

            def report(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=what[:60])

            rep = sanity_check(ex, files, methods, modes=modes[mode], permuted=perm, seed=seed, max_steps=max_steps,
                               target=target, layer=O.one_or_many(layer), score=score, region=region, options=options,
                               threshold=threshold, like=None if like is None else _reference(like), progress=report)
        written = [os.path.join(out_dir, "sanity.csv"), os.path.join(out_dir, "sanity.json")]
        with _writing(written[0]):
            _write_csv(written[0], rep.rows())
        with _writing(written[1]), open(written[1], "w") as f:
            json.dump(rep.summary(), f, indent=2)
        for i, name in enumerate(rep.images):
            path = os.path.join(out_dir, f"sanity_{name}.png")
            with _writing(path):
                figure(path, rep, i, cmap=cmap)
            written.append(path)
    if quiet:
        return
    print_sanity(rep, out)
    out.print(esc("wrote " + ", ".join(written[:3]) + (f" (+{len(written) - 3} figures)" if len(written) > 3 else "")))


def print_sanity(rep, console) -> None:
    """The tables: one per method (a row per randomisation step), then the verdicts."""
    from rich.table import Table

    from .similarity import MEASURES

    n_layers = len(rep.layers)
    console.print(f"[bold]{esc(os.path.basename(rep.model))}[/]: {n_layers} weight layers, "
                  f"{len(rep.images)} image(s), targets: " + esc(", ".join(f"{k}: {v}" for k, v in rep.targets.items())))
    heads = {"spearman": "Spearman", "spearman_abs": "Spearman(abs)", "ssim": "SSIM", "hog": "HOG (Pearson)"}
    for m in rep.methods:
        table = Table(title=f"{m}: similarity to the original map (mean ± std over images)", title_justify="left")
        for col in ("test", "step", "randomised"):
            table.add_column(col)
        for k in MEASURES:
            table.add_column(heads[k], justify="right")
        for k, s in enumerate(rep.steps):
            mu, sd = rep.mean(m, k), rep.std(m, k)
            table.add_row(s.mode, str(s.index), esc(s.label), *[_pm(mu[x], sd[x], 2) for x in MEASURES])
        console.print(table)
    verdicts = rep.verdicts()
    if not verdicts:
        console.print("no verdict: run the cascading test (--mode cascading or both) for one")
        return
    table = Table(title="verdicts", title_justify="left")
    for col in ("method", "test", "verdict"):
        table.add_column(col)
    for v in verdicts:
        style = "green" if v.passed else "red"
        table.add_row(v.method, v.mode, f"[{style}]{v.text}[/]")
    console.print(table)


# evaluate -----------------------------------------------------------------------------------

def evaluate(
    model: str = typer.Argument(..., help="ONNX model file"),
    images: List[str] = typer.Argument(..., help="image files or folders"),
    method: List[str] = typer.Option(["gradcam"], "--method", "-m", help="method name, repeatable, or 'all'"),
    masks: Optional[str] = typer.Option(None, help="folder of object masks named like the images: adds the pointing games"),
    step: Optional[int] = typer.Option(None, help="pixels changed per step (default: input pixels / 224, "
                                       "i.e. 224 pixels at 224x224)"),
    substrate: str = typer.Option("black", help="deletion substrate: black (a black image, preprocessed), "
                                  "zero (an all-zero tensor) or blur"),
    start: str = typer.Option("blur", help="insertion start: blur, black or zero"),
    blur_sigma: Optional[float] = typer.Option(None, help="Gaussian sigma in input pixels (default: input size / 16)"),
    tolerance: float = typer.Option(15, help="pointing game tolerance in image pixels"),
    target: Optional[str] = O.TARGET,
    layer: List[str] = O.LAYERS,
    score: str = O.SCORE,
    region: str = O.REGION,
    like: Optional[str] = O.LIKE,
    option: List[str] = O.OPTION,
    out_dir: str = O.OUT_DIR,
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
    quiet: bool = O.QUIET,
) -> None:
    """Deletion/insertion AUC (RISE) and, with --masks, the pointing games, per method.

    Writes evaluation.csv (one row per image and method), evaluation.json (means, spreads, mean
    curves, settings) and curves.png into --out.
    """
    from ..cli import _explainer, _reference, method_options, out
    from ..outputs import output_folder
    from .faithfulness import SUBSTRATES, evaluate as run
    from .localization import find_mask, load_mask

    for name, kind in (("--substrate", substrate), ("--start", start)):
        if kind not in SUBSTRATES:
            raise MethodError(f"{name} must be one of {', '.join(SUBSTRATES)}, not {kind!r}")
    methods = _method_names(method)
    options = method_options(methods, option)
    files = collect_images(images)
    with output_folder(out_dir):
        mask_arrays = None
        if masks is not None:
            if not os.path.isdir(masks):
                raise MissingFileError(f"masks folder not found: {masks}")
            mask_arrays = []
            for f in files:
                stem = os.path.basename(f).rsplit(".", 1)[0]
                path = find_mask(masks, stem)
                if path is None:
                    raise MissingFileError(f"no mask for {os.path.basename(f)} in {masks} "
                                           f"(expected {stem}.png or similar)")
                mask_arrays.append(load_mask(path))
        ex = _explainer(model, device, size, preprocess, mean, std, scale, bgr, labels, batch_size, feed, head)
        if like is not None:
            ex = ex.like(_reference(like))
        with _progress(quiet) as bar:
            task = bar.add_task("evaluate", total=None)

            def report(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=what[:60])

            rep = run(ex, files, methods, masks=mask_arrays, step=step, deletion=substrate, insertion=start,
                      blur_sigma=blur_sigma, tolerance=tolerance, target=target, layer=O.one_or_many(layer), score=score,
                      region=region, options=options, progress=report)
        paths = [os.path.join(out_dir, n) for n in ("evaluation.csv", "evaluation.json", "curves.png")]
        with _writing(paths[0]):
            _write_csv(paths[0], rep.rows())
        with _writing(paths[1]), open(paths[1], "w") as f:
            json.dump(rep.summary(), f, indent=2)
        with _writing(paths[2]):
            curves_figure(paths[2], rep)
    if quiet:
        return
    print_evaluation(rep, out)
    out.print(esc("wrote " + ", ".join(paths)))


def print_evaluation(rep, console) -> None:
    """One row per method, ranked by its mean rank over the measured metrics."""
    from rich.table import Table

    from .faithfulness import METRICS

    s = rep.settings
    console.print(f"[bold]{esc(os.path.basename(rep.model))}[/]: {len(rep.images)} image(s); {s['steps']} steps of "
                  f"{s['step']} pixels; deletion to {s['deletion_substrate']}, insertion from {s['insertion_start']} "
                  f"(sigma {s['blur_sigma']:.3g}); score: {s['score']}")
    stats = {m: rep.stats(m) for m in rep.methods}
    keys = [k for k in METRICS if any(k in stats[m] for m in rep.methods)]
    table = Table(title="faithfulness and localisation (mean ± std over images)", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("method")
    for k in keys:
        name, higher = METRICS[k]
        table.add_column(f"{name} {'↑' if higher else '↓'}", justify="right")
    table.add_column("s/map", justify="right")
    for m, mean_rank in rep.ranked():
        st = stats[m]
        cells = []
        for k in keys:
            if k not in st:
                cells.append("-")
            elif k == "hit":
                n = sum(1 for r in rep.of(m) if r.hit is not None)
                cells.append(f"{st[k][0]:.3f} ({int(round(st[k][0] * n))}/{n})")
            else:
                cells.append(_pm(*st[k]))
        table.add_row(f"{mean_rank:.2f}", m, *cells, f"{st['seconds'][0]:.3f}")
    console.print(table)
    console.print("rank: mean over the columns of each method's rank (1 = best on all); "
                  "pointing game tolerance " f"{s['tolerance']:g} px", style="dim")


def curves_figure(path: str, rep) -> None:
    """Mean deletion and insertion curves of every method, side by side."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    ax_d, ax_i = fig.subplots(1, 2)
    if len(rep.methods) > 10:  # the default cycle repeats after ten colours
        from cycler import cycler
        from matplotlib import colormaps

        colours = cycler(color=[colormaps["tab20"](i % 20) for i in range(len(rep.methods))])
        ax_d.set_prop_cycle(colours)
        ax_i.set_prop_cycle(colours)
    for m in rep.methods:
        rs = rep.of(m)
        x = rs[0].curves.x
        st = rep.stats(m)
        ax_d.plot(x, np.mean([r.curves.deletion for r in rs], axis=0), label=f"{m} ({st['deletion'][0]:.3f})")
        ax_i.plot(x, np.mean([r.curves.insertion for r in rs], axis=0), label=f"{m} ({st['insertion'][0]:.3f})")
    for ax, title in ((ax_d, "deletion (AUC, lower is better)"), (ax_i, "insertion (AUC, higher is better)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fraction of pixels changed")
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7)
    values = [v for m in rep.methods for r in rep.of(m) for v in (r.curves.deletion, r.curves.insertion)]
    lo, hi = float(np.min(values)), float(np.max(values))
    for ax in (ax_d, ax_i):      # a heatmap's value or a similarity need not lie in [0, 1]
        ax.set_ylim(min(0.0, lo - 0.02 * abs(lo)), max(1.02, hi + 0.02 * abs(hi)))
    ax_d.set_ylabel(rep.settings["score"] if len(rep.settings["score"]) < 40 else "target's score")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise OutputError(f"cannot write {path!r}: {exc.strerror or exc}") from exc
