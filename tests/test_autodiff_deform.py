"""DeformConv (torchvision.ops.deform_conv2d, opset 19) in the gradient graph: written out as one
GridSample per offset group and a 1x1 Conv (onnxsal/graph/deform.py), checked against ONNX
Runtime's own DeformConv kernel, forward and by finite differences, over groups, offset groups,
strides, dilations, asymmetric pads, with and without mask and bias, at opsets 19 and 20.

Bilinear reads are kinked where a position crosses a whole pixel: the offsets' fractional parts
stay 0.15 or more from one, so no difference straddles a kink (the regular places are whole).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from gradcheck import check_vjp, one_node_model
from onnxsal.errors import UnsupportedOpError
from onnxsal.graph import deform
from onnxsal.graph.autodiff import vjp
from onnxsal.graph.normalize import normalize

R = np.random.default_rng(23)


def _offsets(shape, scale):
    a = R.standard_normal(shape) * scale
    whole = np.floor(a)
    return (whole + np.clip(a - whole, 0.15, 0.85)).astype(np.float32)


def deform_model(c=4, h=6, w=7, oc=6, k=(3, 3), groups=1, og=1, strides=(1, 1), dil=(1, 1), pads=(1, 1, 1, 1),
                 mask=True, bias=True, opset=19, scale=1.5):
    kh, kw = k
    oh = (h + pads[0] + pads[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (w + pads[1] + pads[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    feeds = {"x": R.standard_normal((2, c, h, w)).astype(np.float32),
             "off": _offsets((2, og * kh * kw * 2, oh, ow), scale)}
    inits = {"w": R.standard_normal((oc, c // groups, kh, kw)).astype(np.float32)}
    names = ["x", "w", "off"]
    if bias:
        inits["b"] = R.standard_normal(oc).astype(np.float32)
        names.append("b")
    if mask:
        names += ([] if bias else [""]) + ["m"]
        feeds["m"] = (R.random((2, og * kh * kw, oh, ow)) + 0.2).astype(np.float32)
    attrs = dict(group=groups, offset_group=og, strides=list(strides), dilations=list(dil), pads=list(pads),
                 kernel_shape=[kh, kw])
    return one_node_model("DeformConv", feeds, attrs, inits, opset=opset, node_inputs=names), feeds


CASES = {
    "plain": {}, "groups-and-offset-groups": dict(groups=2, og=2), "offset-groups-no-bias": dict(og=2, bias=False),
    "strided-dilated-asymmetric-no-mask": dict(strides=(2, 3), dil=(2, 1), pads=(2, 0, 1, 1), mask=False),
    "offsets-past-the-border": dict(scale=4.0), "opset-20": dict(opset=20, k=(2, 3), pads=(0, 1, 1, 1)),
}


@pytest.mark.parametrize("kw", list(CASES.values()), ids=list(CASES))
def test_written_out_forward_is_the_kernel_s(kw):
    m, feeds = deform_model(**kw)
    want = ort.InferenceSession(m.SerializeToString()).run(None, feeds)[0]
    written, refused = deform.expand(normalize(m))
    assert not refused and not any(n.op_type == "DeformConv" for n in written.graph.node)
    got = ort.InferenceSession(written.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("kw", list(CASES.values()), ids=list(CASES))
def test_deform_conv_against_finite_differences(kw):
    """Image, offsets and mask, each by central differences of the kernel itself."""
    m, feeds = deform_model(**kw)
    check_vjp(m, "y", list(feeds), feeds, eps=1e-2, rtol=1e-2, atol=1e-3, forward_atol=2e-5)


def test_unknown_sizes_are_refused_by_name():
    m, feeds = deform_model()
    for vi in m.graph.input:
        if vi.name == "off":
            vi.type.tensor_type.shape.dim[2].dim_param = "h"
    m.graph.output[0].type.tensor_type.ClearField("shape")
    with pytest.raises(UnsupportedOpError, match=r"DeformConv.*offsets of unknown size"):
        vjp(m, "y", ["x"])


def test_grad_cam_at_a_deformable_layer(tmp_path):
    """image -> Conv (offsets) -> DeformConv -> Relu -> mean -> Gemm: the DeformConv's output is a
    candidate layer (the default one here), and Grad-CAM there is the formula on its activations
    and the head's gradient, mean_hw(W[c] / HW * [A > 0]) per channel."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import onnxsal

    rng = np.random.default_rng(8)
    consts = {"w_off": (rng.standard_normal((18, 3, 3, 3)) * 0.3).astype(np.float32),
              "w_def": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
              "fc": rng.standard_normal((4, 6)).astype(np.float32), "hw": np.array([2, 3], np.int64)}
    nodes = [helper.make_node("Conv", ["image", "w_off"], ["offsets"], pads=[1, 1, 1, 1]),
             helper.make_node("DeformConv", ["image", "w_def", "offsets"], ["deformed"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["deformed"], ["act"]),
             helper.make_node("ReduceMean", ["act", "hw"], ["pooled"], keepdims=0),
             helper.make_node("Gemm", ["pooled", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "dcn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 4])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    path = str(tmp_path / "dcn.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    assert ex.model.default_layer.tensor == "act" and "deformed" in [la.tensor for la in ex.model.layers]
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    from onnxsal.graph.surgery import expose

    a = ort.InferenceSession(expose(onnx.load(path), ["deformed"]).SerializeToString()).run(["deformed"], {"image": x})[0][0]
    for c in range(4):
        weights = (consts["fc"][c][:, None, None] / 64 * (a > 0)).mean(axis=(1, 2))
        want = np.maximum((weights[:, None, None] * a).sum(axis=0), 0)
        got = ex.explain(x, "gradcam", c, layer="deformed").raw[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * want.max())
