"""The explainer as one ONNX graph: (image, target) -> (logits, map).

The VJP graph is extended with the target's one-hot cotangent in front and the
method's map arithmetic behind (weights, ReLU, bilinear Resize to the input size,
per-image min-max), so any ONNX Runtime (C++, C#, Java, JavaScript) can explain
without onnxsal. SmoothGrad and IG stack their extra rows behind the clean
image in one batch; the clean rows give the logits.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .engine import check_region
from .errors import LayerError, MethodError
from .graph.autodiff import vjp
from .graph.integer_input import PIXEL_TYPES
from .graph.normalize import opset_of
from .graph.surgery import rename_tensor
from .graph.weights import attach
from .detection import DetectionList, QueryOutput
from .labelled import ClassBest
from .model import Model, load
from .methods import number_option
from .methods.gradients import ig_path
from .similarity import as_input, holds_reference, reference_width

EXPORTABLE = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcamelementwise", "shapleycam",
              "layerig", "saliency", "smoothgrad", "ig", "inputxgradient", "fullgrad")
GRADIENT = ("saliency", "smoothgrad", "ig", "inputxgradient", "fullgrad")
EPS = 1e-7


class _Emitter:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.opset = opset_of(model)
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"onnxsal_x/{hint}_{self.n}"

    def op(self, op_type: str, inputs: list[str], hint: Optional[str] = None, out: Optional[str] = None, **attrs) -> str:
        y = out or self.name(hint or op_type.lower())
        self.g.node.append(helper.make_node(op_type, inputs, [y], name=self.name(op_type), **attrs))
        return y

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        name = self.name(hint)
        self.g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.const(axes, np.int64, "axes")], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)


def _toposort(g: onnx.GraphProto) -> None:
    """Kahn's order over the nodes: the prefix nodes were appended after the nodes that use them."""
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise MethodError(f"export built a graph with a cycle or a missing tensor near {rest[0].name!r}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def _free_names(model: onnx.ModelProto, names, keep: str) -> tuple[onnx.ModelProto, dict]:
    """A copy of the model whose tensors no longer clash with the exported graph's own input/output
    names, and the old -> new map of what was renamed."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    taken = {o for n in g.node for o in n.output} | {i.name for i in g.initializer}
    renamed = {name: f"onnxsal_model/{name}" for name in names if name in taken and name != keep}
    if not renamed:
        return model, renamed
    for node in g.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    for item in list(g.value_info) + list(g.output) + list(g.initializer):
        item.name = renamed.get(item.name, item.name)
    return model, renamed


LIG = "onnxsal_lig/"


def _take_pixels(g: onnx.GraphProto, x_name: str, elem_type: int, real: str) -> None:
    """Input ``x_name`` as the model file's integer pixels, cast to the float image the graph reads."""
    rename_tensor(g, x_name, real)
    vi = next(i for i in g.input if i.name == real)
    vi.name, vi.type.tensor_type.elem_type = x_name, elem_type
    g.node.insert(0, helper.make_node("Cast", [x_name], [real], name=f"{real}/Cast", to=TensorProto.FLOAT))


def _layer_ig_path(proto: onnx.ModelProto, x_name: str, layer: str, logits: str,
                   steps: int) -> tuple[str, str, np.ndarray]:
    """Rewrite ``proto`` in place for Layer IG in one batch: the images and their zero baselines run
    to ``layer`` (2N rows); the layer's consumers then read P, the images' activations (N rows, whose
    logits are the output) followed by the Gauss-Legendre path points a0 + alpha (a - a0) (steps x N
    rows). Returns (P, a - a0, quadrature weights). Refuses a layer a skip connection goes around,
    whose tail would also need the input's rows."""
    from .graph.surgery import split

    split(proto, layer, [logits])
    nodes, w = ig_path(int(steps), "gausslegendre", more="")
    alphas = np.concatenate([[1.0], nodes]).astype(np.float32)
    g = proto.graph
    n = lambda s: LIG + s  # noqa: E731
    consts = {n("one"): np.array([1], np.int64), n("axis0"): np.array([0], np.int64),
              n("end"): np.array([np.iinfo(np.int64).max], np.int64), n("minus1"): np.array([-1], np.int64)}
    for k, v in consts.items():
        g.initializer.append(numpy_helper.from_array(v, k))
    g.initializer.append(numpy_helper.from_array(alphas.reshape(-1, 1, 1, 1, 1), n("alphas")))
    for node in g.node:                      # the network now runs on images + baselines, and reads P after the layer
        node.input[:] = [n("rows") if i == x_name else (n("P") if i == layer else i) for i in node.input]
    g.node.extend([
        helper.make_node("Mul", [x_name, n("zero_f")], [n("baseline")]),
        helper.make_node("Concat", [x_name, n("baseline")], [n("rows")], axis=0),
        helper.make_node("Shape", [x_name], [n("x_shape")]),
        helper.make_node("Slice", [n("x_shape"), n("axis0"), n("one")], [n("count")]),
        helper.make_node("Slice", [layer, n("axis0"), n("count"), n("axis0")], [n("a")]),
        helper.make_node("Slice", [layer, n("count"), n("end"), n("axis0")], [n("a0")]),
        helper.make_node("Sub", [n("a"), n("a0")], [n("d")]),
        helper.make_node("Unsqueeze", [n("a0"), n("axis0")], [n("a0_1")]),
        helper.make_node("Unsqueeze", [n("d"), n("axis0")], [n("d_1")]),
        helper.make_node("Mul", [n("d_1"), n("alphas")], [n("steps")]),
        helper.make_node("Add", [n("a0_1"), n("steps")], [n("path")]),
        helper.make_node("Shape", [layer], [n("l_shape")]),
        helper.make_node("Slice", [n("l_shape"), n("one"), n("end")], [n("l_rest")]),
        helper.make_node("Concat", [n("minus1"), n("l_rest")], [n("p_shape")], axis=0),
        helper.make_node("Reshape", [n("path"), n("p_shape")], [n("P")]),
    ])
    g.initializer.append(numpy_helper.from_array(np.array(0, np.float32), n("zero_f")))
    _toposort(g)
    return n("P"), n("d"), w.astype(np.float32)


def _checked_target(e: "_Emitter", target: str, n: int) -> str:
    """The target input, made to fail in ONNX Runtime when a class is outside 0..n-1.

    A one-hot row of class 99 is all zeros, so a service asking for it would get a blank map and
    no error. Gather refuses an index outside [-n, n-1]: one Gather of the target and one of
    target - n (which refuses the negatives) leave only 0..n-1. Both read an int64 zero, so the
    checked target is the target plus 0 and depends on both; the nodes are named for what they check."""
    zeros = e.const(np.zeros(n, np.int64), np.int64, "classes")
    below = e.op("Gather", [zeros, target], hint="target_below")
    e.g.node[-1].name = f"target_must_be_below_{n}"          # ONNX Runtime's error names the node
    not_negative = e.op("Gather", [zeros, e.op("Sub", [target, e.const(n, np.int64)])], hint="target_from")
    e.g.node[-1].name = "target_must_be_0_or_more"
    return e.op("Add", [e.op("Add", [target, below]), not_negative], hint="target_checked")


def export(model, method: str = "gradcam", layer: Optional[str] = None, *, n_samples: int = 20,
           noise_level: float = 0.15, steps: int = 32, region: str = "won",
           reference_input: bool = False) -> onnx.ModelProto:
    """A standalone graph: inputs (image, target int64[N] or [1] for all); outputs (logits [N, C], map [N, H, W]
    in [0, 1]).

    ``model``: a path, an onnx.ModelProto, a loaded Model, or an Explainer (its model as set up:
    ``export(ex.like(reference))`` exports a similarity).

    For a per-pixel model the logits are its class maps, and a target class scores its map over the
    pixels the image's output assigns to it (its peak, or the whole map, with ``region``), as
    ``Explainer.explain`` does; for a detector they are its
    (N, rows, anchors) output, and a class scores its confidence at its most confident anchor (its most
    confident kept detection, for final detections: with none, its map is empty).

    ``reference_input``: for a model that scores a similarity (``Explainer.like``), the graph takes
    the reference as a third input, ``reference``, instead of holding it as a constant: (1, D) for
    every image, or (N, D), each image's own."""
    steps = number_option("export's steps", steps, int, False)
    n_samples = number_option("export's n_samples", n_samples, int, False)
    noise_level = number_option("export's noise_level", noise_level, float, False)
    if steps < 1 or n_samples < 1 or noise_level < 0:
        raise MethodError(f"export needs steps >= 1, n_samples >= 1 and noise_level >= 0, not {steps}, {n_samples} "
                          f"and {noise_level}")
    from .explainer import Explainer

    m: Model = load(model.model if isinstance(model, Explainer) else model)   # an Explainer's own model, as set up
    if reference_input and not holds_reference(m.light.graph):
        raise MethodError("a reference input needs a model that scores a similarity (Explainer.like, "
                          "export --like input)")
    method = method.lower() if isinstance(method, str) else method
    if not isinstance(method, str) or method not in EXPORTABLE:
        raise MethodError(f"export supports {', '.join(EXPORTABLE)}, not {method!r}")
    check_region(m, region)
    stacks = method in ("smoothgrad", "ig", "layerig")     # copies of the image run in one batch
    if stacks or m.fixed_batch:
        from .engine import Engine
        from .runtime import Runtime

        runtime = Runtime("cpu")
        Engine(m, runtime).pin_mixed_rows()       # a fixed batch: runs two images together and alone
        if runtime.padded:
            raise MethodError(f"this model's graph runs only at the batch of {m.fixed_batch} its file fixes, "
                              "where onnxsal cannot free it, and the exported graph takes any batch; export the "
                              "model with a dynamic batch")
        if runtime.one_row and stacks:
            raise MethodError(f"export -m {method} runs its copies of the image in one batch, and this model's "
                              "graph runs one image at a time (its export fixed a batch of 1 where onnxsal cannot "
                              "free it); export gradcam or saliency, or export the model with a dynamic batch")
    if m.one_image and stacks:
        advice = ("or export the model with a dynamic batch" if m.fixed_batch else
                  "and give the exported graph one image per run")
        raise MethodError(f"export -m {method} runs its copies of the image in one batch, and this model's graph "
                          f"reads across its batch ({m.one_image[0]}); export gradcam or saliency, {advice}")
    x_name = m.input.name
    cam = method not in GRADIENT
    if cam and isinstance(layer, (list, tuple)):
        if len(layer) != 1:
            raise LayerError(f"export writes a CAM of one layer, not of {len(layer)}: explain averages several "
                             "layers (layer=[...], --layer repeated)")
        layer = layer[0]
    lay = m.find_layer(layer) if cam else None     # resolved on the model as given (aliases, node names)
    proto, renamed = _free_names(m.light, ("logits", "map", "target"), keep=x_name)
    logits = renamed.get(m.logits, m.logits)
    layer_tensor = renamed.get(lay.tensor, lay.tensor) if cam else None
    wrt = layer_tensor if cam else x_name
    biases = []
    if method == "fullgrad":
        from .methods.fullgrad import bias_layers

        biases = [(renamed.get(b.tensor, b.tensor), b.bias) for b in bias_layers(m)]
    scored = logits
    if method == "layerig":         # images and baselines to the layer, then the path through the rest
        path_t, delta, lig_weights = _layer_ig_path(proto, x_name, layer_tensor, logits, steps)
        g_model = vjp(proto, logits, [path_t])
    elif method == "shapleycam":      # the ReST head, then the VJP graph differentiated again (H A)
        from .graph.surgery import with_rest_head
        from .graph.second import first_grad_name, hvp

        if m.dense is not None or m.detection is not None:
            raise MethodError("export builds ShapleyCAM for classifiers; this model outputs "
                              + ("per-pixel maps" if m.dense is not None else "a detector's boxes"))
        scored = with_rest_head(proto, logits)
        g_model = hvp(proto, scored, wrt, outputs=[logits])
    else:
        g_model = vjp(proto, logits, [wrt] + [t for t, _ in biases], outputs=[wrt] if cam else [])
    e = _Emitter(g_model)
    g = e.g
    model_nodes = len(g.node)                    # the gradient graph's own nodes, before the explainer's
    grad_y = f"grad_{scored}"
    fed = {grad_y}
    if method == "shapleycam":      # the Hessian is applied to the activations themselves
        v = f"grad_{first_grad_name(wrt)}"
        fed.add(v)
        e.op("Identity", [wrt], out=v)
    inputs = [i for i in g.input if i.name not in fed]
    del g.input[:]
    g.input.extend(inputs)
    g.input.append(helper.make_tensor_value_info("target", TensorProto.INT64, ["N"]))
    target = _checked_target(e, "target", m.n_targets)
    # one target serves every image (as explain_batch's one-for-all); N targets, one per image
    n_images = e.op("Slice", [e.op("Shape", [x_name]), e.const([0], np.int64), e.const([1], np.int64)])
    target = e.op("Expand", [target, n_images], hint="target_per_image")
    e.g.node[-1].name = "target_must_be_one_or_one_per_image"     # ONNX Runtime's error names the node

    rows_target = target
    clean = None
    if method == "layerig":         # the images' own rows first, then the path points: like IG's rows below
        k = int(steps)
        rows_target = e.op("Concat", [target, e.op("Tile", [target, e.const([k], np.int64)])], axis=0)
        clean = (k, lig_weights)
    elif method in ("smoothgrad", "ig"):
        rows = e.name("rows")
        for node in g.node[:model_nodes]:         # the VJP graph now runs on the stacked rows
            for k, i in enumerate(node.input):
                if i == x_name:
                    node.input[k] = rows
        img = x_name
        nrank = 4
        if method == "smoothgrad":
            k = int(n_samples)
            reps = e.const([k, 1, 1, 1], np.int64, "reps")
            spatial = [1, 2, 3]
            span = e.op("Sub", [e.reduce("ReduceMax", img, spatial), e.reduce("ReduceMin", img, spatial)])
            sigma = e.op("Mul", [span, e.const(noise_level)])
            tiled = e.op("Tile", [img, reps])
            noise = e.op("RandomNormalLike", [tiled], dtype=TensorProto.FLOAT, mean=0.0, scale=1.0)
            extra = e.op("Add", [tiled, e.op("Mul", [noise, e.op("Tile", [sigma, reps])])])
            weights = np.full(k, 1.0 / k, np.float32)
        else:
            k = int(steps)
            nodes, w = ig_path(k, "gausslegendre", more="")
            alphas = e.const(nodes.reshape(k, 1, 1, 1, 1))
            path = e.op("Mul", [e.op("Unsqueeze", [img, e.const([0], np.int64)]), alphas])
            shape = e.op("Concat", [e.const([-1], np.int64), e.op("Slice", [e.op("Shape", [img]), e.const([1], np.int64),
                                                                          e.const([nrank], np.int64)])], axis=0)
            extra = e.op("Reshape", [path, shape])
            weights = w.astype(np.float32)
        e.op("Concat", [img, extra], out=rows, axis=0)
        rows_target = e.op("Concat", [target, e.op("Tile", [target, e.const([k], np.int64)])], axis=0)
        clean = (k, weights)

    # cotangent: one-hot rows of the target (zeros for the clean rows when rows are stacked)
    dense, det = m.dense, m.detection
    if isinstance(det, ClassBest):      # columns of classes, each picking its own detection in the graph
        det = None
    width = dense.classes if dense is not None else det.width if isinstance(det, QueryOutput) else \
        det.rows if det is not None else m.num_classes
    binary = m.binary and dense is None and det is None
    depth = "" if binary else e.const([width], np.int64, "depth")     # a single unit needs no one-hot
    if isinstance(det, DetectionList):          # every row scores a detection's score column
        hot_row = e.op("Add", [e.op("Mul", [rows_target, e.const(0, np.int64)]), e.const(4, np.int64)])
    elif det is not None and det.first:         # the class's row or column after the box rows or background
        hot_row = e.op("Add", [rows_target, e.const(det.first, np.int64)])
    else:
        hot_row = rows_target
    if binary:                                  # one unit: class 1 scores +logit, class 0 -logit
        sign = e.op("Sub", [e.op("Mul", [e.op("Cast", [rows_target], to=TensorProto.FLOAT), e.const(2.0)]), e.const(1.0)])
        onehot = e.op("Unsqueeze", [sign, e.const([1], np.int64)])
    else:
        onehot = e.op("OneHot", [hot_row, depth, e.const([0.0, 1.0])], axis=-1)
    n_img = e.op("Squeeze", [n_images, e.const([0], np.int64)])     # the image count as a scalar
    if clean is not None:
        n_rows = e.op("Gather", [e.op("Shape", [rows_target]), e.const(0, np.int64)])
        row = e.op("Range", [e.const(0, np.int64), n_rows, e.const(1, np.int64)])
        extra_row = e.op("Greater", [row, e.op("Sub", [n_img, e.const(1, np.int64)])])   # clean rows get no cotangent
        mask = e.op("Cast", [extra_row], to=TensorProto.FLOAT)
        onehot = e.op("Mul", [onehot, e.op("Unsqueeze", [mask, e.const([1], np.int64)])])
    if dense is not None or det is not None and not isinstance(det, DetectionList):   # picked in the images' own rows
        own = e.op("Slice", [logits, e.const([0], np.int64), n_images, e.const([0], np.int64)])
    if isinstance(det, DetectionList):
        # a class scores its most confident kept detection (none: no cotangent, an empty map), picked
        # in every row's own output: a row index is no detection of its own in a noisy copy or on IG's path

        def column(j: int) -> str:
            return e.op("Squeeze", [e.op("Slice", [logits, e.const([j], np.int64), e.const([j + 1], np.int64),
                                                   e.const([2], np.int64)]), e.const([2], np.int64)])

        score = column(4)
        wanted = e.op("Cast", [e.op("Unsqueeze", [rows_target, e.const([1], np.int64)])], to=TensorProto.FLOAT)
        match = e.op("And", [e.op("Equal", [e.op("Round", [column(5)]), wanted]),
                             e.op("Greater", [score, e.const(0.0)])])
        pick = e.op("ArgMax", [e.op("Where", [match, score, e.const(-1.0)])], axis=1, keepdims=0)
        found = e.reduce("ReduceMax", e.op("Cast", [match], to=TensorProto.FLOAT), [1], keepdims=0)
        hot = e.op("Mul", [e.op("OneHot", [pick, e.const([det.kept], np.int64), e.const([0.0, 1.0])], axis=-1),
                           e.op("Unsqueeze", [found, e.const([1], np.int64)])])
        e.op("Mul", [e.op("Unsqueeze", [hot, e.const([2], np.int64)]),
                     e.op("Unsqueeze", [onehot, e.const([1], np.int64)])], out=grad_y)
    elif isinstance(det, QueryOutput):
        # a class scores its entry at the query most probably of that class in the image's output
        # the query picked by log-probability or logit, as explain picks it: a probability rounds to 1
        ranking = e.op("LogSoftmax", [own], axis=-1) if det.reading == "softmax" else own
        column_of = e.op("Add", [target, e.const(det.first, np.int64)]) if det.first else target
        hot_class = e.op("OneHot", [column_of, depth, e.const([0.0, 1.0])], axis=-1)
        column = e.reduce("ReduceSum", e.op("Mul", [ranking, e.op("Unsqueeze", [hot_class, e.const([1], np.int64)])]),
                          [2], keepdims=0)
        query = e.op("ArgMax", [column], axis=1, keepdims=0)
        if clean is not None:
            query = e.op("Concat", [query, e.op("Tile", [query, e.const([clean[0]], np.int64)])], axis=0)
        hot_query = e.op("OneHot", [query, e.const([det.queries], np.int64), e.const([0.0, 1.0])], axis=-1)
        e.op("Mul", [e.op("Unsqueeze", [hot_query, e.const([2], np.int64)]),
                     e.op("Unsqueeze", [onehot, e.const([1], np.int64)])], out=grad_y)
    elif det is not None:
        # a class scores its confidence at the anchor where the image's output has it highest
        conf = e.op("Slice", [own, e.const([det.first], np.int64), e.const([det.first + det.classes], np.int64),
                              e.const([1], np.int64)])
        best = e.op("ArgMax", [conf], axis=2, keepdims=0)
        anchor = e.op("Reshape", [e.op("GatherElements", [best, e.op("Reshape", [target, e.const([-1, 1], np.int64)])],
                                       axis=1), e.const([-1], np.int64)])
        if clean is not None:
            anchor = e.op("Concat", [anchor, e.op("Tile", [anchor, e.const([clean[0]], np.int64)])], axis=0)
        hot_anchor = e.op("OneHot", [anchor, e.const([det.anchors], np.int64), e.const([0.0, 1.0])], axis=-1)
        e.op("Mul", [e.op("Unsqueeze", [onehot, e.const([2], np.int64)]),
                     e.op("Unsqueeze", [hot_anchor, e.const([1], np.int64)])], out=grad_y)
    elif dense is None:
        e.op("Reshape", [onehot, e.op("Shape", [logits])], out=grad_y)
    else:
        # a class scores its map over the pixels each image's output assigns to it (all of them when none)
        c_ax = 3 if dense.channels_last else 1
        per_class = [-1, 1, 1, dense.classes] if dense.channels_last else [-1, dense.classes, 1, 1]

        def class_map(keepdims: int) -> str:
            """Each image's own map of its target class, picked by a one-hot over the class axis."""
            hot = e.op("OneHot", [target, e.const([dense.classes], np.int64), e.const([0.0, 1.0])], axis=-1)
            return e.reduce("ReduceSum", e.op("Mul", [own, e.op("Reshape", [hot, e.const(per_class, np.int64)])]),
                            [c_ax], keepdims=keepdims)

        if region == "peak":          # the class map's highest pixel (a keypoint heatmap's peak)
            hw = dense.height * dense.width
            peak = e.op("ArgMax", [e.op("Reshape", [class_map(0), e.const([-1, hw], np.int64)])], axis=1, keepdims=0)
            won = e.op("Reshape", [e.op("OneHot", [peak, e.const([hw], np.int64), e.const([0.0, 1.0])], axis=-1),
                                   e.const([-1, dense.height, dense.width, 1] if dense.channels_last
                                           else [-1, 1, dense.height, dense.width], np.int64)])
            pixels = won
        elif region == "all":         # ones, (N, 1, h, w) or (N, h, w, 1)
            grid = [dense.height, dense.width, 1] if dense.channels_last else [1, dense.height, dense.width]
            shape = e.op("Concat", [e.op("Slice", [e.op("Shape", [own]), e.const([0], np.int64), e.const([1], np.int64)]),
                                    e.const(grid, np.int64)], axis=0)
            pixels = e.op("ConstantOfShape", [shape], value=numpy_helper.from_array(np.ones(1, np.float32)))
        else:
            if dense.classes == 1:
                won = e.op("Greater", [own, e.const(dense.threshold)])
            elif dense.independent:   # the class's own map above its threshold (maps each after a Sigmoid)
                won = e.op("Greater", [class_map(1), e.const(dense.threshold)])
            else:
                won = e.op("Equal", [e.op("ArgMax", [own], axis=c_ax, keepdims=1),
                                     e.op("Reshape", [target, e.const([-1, 1, 1, 1], np.int64)])])
            pixels = e.op("Cast", [won], to=TensorProto.FLOAT)
            pixels = e.op("Add", [pixels, e.op("Sub", [e.const(1.0), e.reduce("ReduceMax", pixels, [1, 2, 3])])])
        if clean is not None:
            pixels = e.op("Concat", [pixels, e.op("Tile", [pixels, e.const([clean[0], 1, 1, 1], np.int64)])], axis=0)
        e.op("Mul", [e.op("Reshape", [onehot, e.const(per_class, np.int64)]), pixels], out=grad_y)

    def normalize_and_squeeze(mp: str, axis: int) -> str:
        mn = e.reduce("ReduceMin", mp, [1, 2, 3])
        mx = e.reduce("ReduceMax", mp, [1, 2, 3])
        span = e.op("Max", [e.op("Sub", [mx, mn]), e.const(1e-30)])
        return e.op("Squeeze", [e.op("Div", [e.op("Sub", [mp, mn]), span]), e.const([axis], np.int64)], out="map")

    H, W = m.input.size
    c_axis = 1 if m.input.layout == "NCHW" else 3

    def resized(t: str) -> str:
        """(N, 1, h, w) -> (N, 1, H, W), bilinear with half-pixel centres (onnxsal's resize)."""
        sizes = e.op("Concat", [e.op("Slice", [e.op("Shape", [t]), e.const([0], np.int64), e.const([2], np.int64)]),
                                e.const([H, W], np.int64)], axis=0)
        return e.op("Resize", [t, "", "", sizes], mode="linear", coordinate_transformation_mode="half_pixel")

    def scaled_channel_sum(t: str, spatial: list, channel: int) -> str:
        """Each channel min-max normalised over its positions, (t - min) / (1e-7 + max - min), then summed."""
        mn = e.reduce("ReduceMin", t, spatial)
        span = e.op("Add", [e.op("Sub", [e.reduce("ReduceMax", t, spatial), mn]), e.const(EPS)])
        return e.reduce("ReduceSum", e.op("Div", [e.op("Sub", [t, mn]), span]), [channel])
    logits_out = logits
    if cam:
        def grid(t: str) -> str:
            """A token layer (N, T, C) or channels-last map (N, h, w, C) as (N, C, h, w), as ``Layer.grid``."""
            if not lay.tokens:
                return t
            c, h, w = lay.shape
            if lay.prefix:
                t = e.op("Slice", [t, e.const([lay.prefix], np.int64), e.const([np.iinfo(np.int64).max], np.int64),
                                   e.const([1], np.int64)])
            return e.op("Transpose", [e.op("Reshape", [t, e.const([0, h, w, c], np.int64)])], perm=[0, 3, 1, 2])

    if method == "layerig":        # (a - a0) times the weighted path gradients, summed over channels
        from .graph.normalize import tensor_shapes

        layer_rank = len(tensor_shapes(m.light)[lay.tensor][1])
        k, weights = clean
        logits_out = e.op("Slice", [logits, e.const([0], np.int64), n_images, e.const([0], np.int64)])
        gp = f"grad_{path_t}"
        rest = e.op("Slice", [gp, n_images, e.const([np.iinfo(np.int64).max], np.int64), e.const([0], np.int64)])
        tail = e.op("Slice", [e.op("Shape", [gp]), e.const([1], np.int64), e.const([np.iinfo(np.int64).max], np.int64)])
        stacked = e.op("Reshape", [rest, e.op("Concat", [e.const([k, -1], np.int64), tail], axis=0)])
        mean_g = e.reduce("ReduceSum", e.op("Mul", [stacked, e.const(weights.reshape((-1,) + (1,) * layer_rank))]), [0], keepdims=0)
        attr = grid(e.op("Mul", [delta, mean_g]))
        normalize_and_squeeze(resized(e.reduce("ReduceSum", attr, [1])), 1)
    elif cam:
        if method == "shapleycam":
            a, first, gr = grid(layer_tensor), grid(first_grad_name(layer_tensor)), grid(f"grad_{layer_tensor}")
        else:
            a, gr = grid(layer_tensor), grid(f"grad_{layer_tensor}")
        if method == "layercam":
            camv = e.reduce("ReduceSum", e.op("Mul", [e.op("Relu", [gr]), a]), [1])
        elif method == "hirescam":
            camv = e.reduce("ReduceSum", e.op("Mul", [gr, a]), [1])
        elif method == "gradcamelementwise":
            camv = e.reduce("ReduceSum", e.op("Relu", [e.op("Mul", [gr, a])]), [1])
        else:
            if method == "shapleycam":        # mean of G - H A / 2
                shifted = e.op("Sub", [first, e.op("Mul", [gr, e.const(0.5)])])
                w = e.reduce("ReduceMean", shifted, [2, 3])
            elif method == "gradcam":
                w = e.reduce("ReduceMean", gr, [2, 3])
            elif method == "gradcam++":
                g2 = e.op("Mul", [gr, gr])
                g3 = e.op("Mul", [g2, gr])
                s_a = e.reduce("ReduceSum", a, [2, 3])
                denom = e.op("Add", [e.op("Add", [e.op("Mul", [g2, e.const(2.0)]), e.op("Mul", [s_a, g3])]), e.const(EPS)])
                w = e.reduce("ReduceSum", e.op("Mul", [e.op("Div", [g2, denom]), e.op("Relu", [gr])]), [2, 3])
            else:  # xgradcam
                s_a = e.op("Add", [e.reduce("ReduceSum", a, [2, 3]), e.const(EPS)])
                w = e.op("Div", [e.reduce("ReduceSum", e.op("Mul", [gr, a]), [2, 3]), s_a])
            camv = e.reduce("ReduceSum", e.op("Mul", [w, a]), [1])
        normalize_and_squeeze(resized(e.op("Relu", [camv])), 1)
    else:
        gx = f"grad_{x_name}"
        if clean is not None:
            k, weights = clean
            logits_out = e.op("Slice", [logits, e.const([0], np.int64), n_images, e.const([0], np.int64)])  # clean rows first
            rest = e.op("Slice", [gx, n_images, e.const([np.iinfo(np.int64).max], np.int64), e.const([0], np.int64)])
            tail = e.op("Slice", [e.op("Shape", [gx]), e.const([1], np.int64), e.const([4], np.int64)])
            stacked = e.op("Reshape", [rest, e.op("Concat", [e.const([k], np.int64), e.const([-1], np.int64), tail], axis=0)])
            gx = e.reduce("ReduceSum", e.op("Mul", [stacked, e.const(weights.reshape(k, 1, 1, 1, 1))]), [0], keepdims=0)
        if method == "fullgrad":       # each channel min-max normalised, summed, resized; summed over layers
            parts = [scaled_channel_sum(e.op("Abs", [e.op("Mul", [gx, x_name])]), [2, 3] if c_axis == 1 else [1, 2], c_axis)]
            for t, bias in biases:
                b = e.const(bias.reshape(1, -1, 1, 1).astype(np.float32), hint="bias")
                parts.append(resized(scaled_channel_sum(e.op("Abs", [e.op("Mul", [f"grad_{t}", b])]), [2, 3], 1)))
        elif method in ("ig", "inputxgradient"):       # (x - 0) * gradient, summed over channels
            parts = [e.reduce("ReduceSum", e.op("Mul", [gx, x_name]), [c_axis])]
        else:
            parts = [e.reduce("ReduceMax", e.op("Abs", [gx]), [c_axis])]
        if c_axis == 3:                 # the input-resolution map, (N, H, W, 1) -> (N, 1, H, W)
            parts[0] = e.op("Transpose", [parts[0]], perm=[0, 3, 1, 2])
        normalize_and_squeeze(e.op("Sum", parts) if len(parts) > 1 else parts[0], 1)

    if isinstance(det, DetectionList):
        logit_dims = ["N", det.kept, det.rows]
    elif isinstance(det, QueryOutput):
        logit_dims = ["N", det.queries, det.width]
    elif det is not None:
        logit_dims = ["N", det.rows, det.anchors]
    elif dense is None:
        logit_dims = ["N", m.num_classes]
    elif dense.channels_last:
        logit_dims = ["N", dense.height, dense.width, dense.classes]
    else:
        logit_dims = ["N", dense.classes, dense.height, dense.width]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, logit_dims),
            helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", H, W])]
    e.op("Identity", [logits_out], out="logits")
    del g.output[:]
    g.output.extend(outs)
    g_model.metadata_props.add(key="onnxsal.export", value=method)
    if m.input.elem_type in PIXEL_TYPES:      # a model of integer pixels takes them here too
        _take_pixels(g, x_name, m.input.elem_type, e.name(f"{x_name}_real"))
    if reference_input:             # "reference": (1, D), or one row per image, repeated for stacked copies
        d = reference_width(g)
        source = e.op("Expand", ["reference", e.op("Concat", [n_images, e.const([d], np.int64)], axis=0)])
        e.g.node[-1].name = f"reference_must_be_1_or_N_rows_of_{d}"    # ONNX Runtime's error names the node
        if clean is not None:
            source = e.op("Concat", [source, e.op("Tile", [source, e.const([clean[0], 1], np.int64)])], axis=0)
        as_input(g_model, source=source)
    _toposort(g)
    g_model = attach(g_model)
    onnx.checker.check_model(g_model)
    return g_model
