"""A model with an op the gradient graph cannot take (a Det on the path here, which has no rule):
the gradient methods fail with one error that names the op, the node and the methods that still
explain the model, and each of those methods does explain it, from the API and from the CLI."""

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxsal import Explainer
from onnxsal.errors import UnsupportedOpError
from onnxsal.methods import gradient_free, methods


def _with_det(path: str) -> str:
    """image -> Conv -> four 4x4 matrices per image -> Det -> their product: the score."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Reshape", ["c", "s"], ["m"]),
             helper.make_node("Det", ["m"], ["d"]), helper.make_node("Reshape", ["d", "s2"], ["y"])]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
                              [numpy_helper.from_array(rng.standard_normal((4, 3, 5, 5)).astype(np.float32), "w"),
                               numpy_helper.from_array(np.array([-1, 4, 4, 4], np.int64), "s"),
                               numpy_helper.from_array(np.array([-1, 4], np.int64), "s2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_the_gradient_free_methods_are_known():
    free = gradient_free()
    assert set(free) == {"occlusion", "rise", "scorecam", "fasterscorecam", "ablationcam", "eigencam", "kpcacam", "fem"}
    assert set(free) < set(methods())


@pytest.mark.parametrize("method", ["saliency", "gradcam", "ig"])
def test_a_gradient_method_names_the_op_and_the_way_out(method, tmp_path):
    ex = Explainer(_with_det(str(tmp_path / "det.onnx")), "cpu", preprocess="raw")
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with pytest.raises(UnsupportedOpError, match=r"'Det'.*methods without gradients still explain this model: "
                                                 r"ablationcam, eigencam, fasterscorecam, fem, kpcacam, occlusion, rise, scorecam"):
        ex.explain(x, method, 0)


def test_each_gradient_free_method_explains_it(tmp_path):
    ex = Explainer(_with_det(str(tmp_path / "det.onnx")), "cpu", preprocess="raw")
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    for method in gradient_free():
        res = ex.explain(x, method, 2)
        assert res.map.shape == (8, 8) and np.isfinite(res.map).all() and res.map.max() > 0, method


def test_the_cli_says_it_in_one_line(tmp_path, capsys):
    from onnxsal.cli import main

    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(img)
    code = main(["explain", _with_det(str(tmp_path / "det.onnx")), str(img), "-m", "saliency", "--preprocess", "raw",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'Det'" in err and "occlusion" in err, err


def test_inspect_says_whether_the_gradient_graph_builds(tmp_path, capsys):
    import os

    from onnxsal.cli import main

    assert main(["inspect", _with_det(str(tmp_path / "det.onnx"))]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "gradients none: cannot differentiate op 'Det'" in text and "still explain this model: ablationcam" in text
    demo = os.path.join(os.path.dirname(__file__), "..", "models", "demo", "demo_shapes.onnx")
    assert main(["inspect", demo]) == 0
    assert re.search(r"gradients the gradient graph builds \(\d+ nodes\)", capsys.readouterr().out)


def test_the_methods_table_says_which_run_forward_only(capsys):
    from onnxsal.cli import main

    assert main(["methods"]) == 0
    rows = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.count("│") > 3 and line.split("│")[1].strip()}
    assert set(gradient_free()) <= set(rows)
    for name, line in rows.items():
        assert ("forward only" in line) == (name in gradient_free()), name
