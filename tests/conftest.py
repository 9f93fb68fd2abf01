import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

from onnxsal.graph import weights  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _every_weight_outside_the_graph():
    """Test models are small, so lower the size above which a weight leaves the graph to zero:
    the whole suite then runs the path that large models take (placeholders, external initializers)."""
    old = weights.MIN_BYTES
    weights.MIN_BYTES = 0
    yield
    weights.MIN_BYTES = old


@pytest.fixture(scope="session")
def vit(tmp_path_factory):
    """The ViT-like test net (dynamic batch), its export, and its first LayerNormalization node:
    the token layer pytorch-grad-cam's ViT recipe reads."""
    from test_autodiff_models import build, export

    net = build("vit")
    model = export(net, tmp_path_factory.mktemp("vit") / "m.onnx", dynamic=True)
    ln1 = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    return net, model, ln1
