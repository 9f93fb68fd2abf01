"""onnxsal: saliency maps for any ONNX image model, in ONNX Runtime.

    ex = onnxsal.Explainer("model.onnx")
    result = ex.explain("cat.png", method="gradcam")
    result.map, result.scores, result.save("out/")
"""

from .errors import OnnxsalError
from .explainer import Explainer, Explanation
from .graph.surgery import expose, replace, split
from .methods import methods
from .model import Model, load
from .preprocess import Preprocess


def vjp(model, y, wrt, **kwargs):
    """The model plus a cotangent input ``grad_<y>`` and outputs ``grad_<x>`` for each x in `wrt`.
    `model`: an onnx.ModelProto, an ONNX file's path or a loaded Model; `wrt`: one tensor name or a list."""
    from .graph.autodiff import vjp as _vjp
    from .graph.surgery import as_proto, given_names

    return _vjp(as_proto(model), y, given_names(wrt, "the wrt tensors"), **kwargs)


__all__ = ["Explainer", "Explanation", "Model", "OnnxsalError", "Preprocess", "expose", "load", "methods", "replace",
           "split", "vjp"]
__version__ = "0.1.0"
