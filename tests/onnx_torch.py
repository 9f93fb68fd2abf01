"""Run a (small) ONNX graph with PyTorch ops, so autograd gives an independent reference gradient.

Covers the ops of the bundled demo model and the tiny test models; anything else raises.
"""

from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def run(model: onnx.ModelProto, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    env: dict[str, torch.Tensor] = {i.name: torch.tensor(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    env.update(feeds)
    for node in model.graph.node:
        a = _attrs(node)
        x = [env[i] if i else None for i in node.input]
        op = node.op_type
        if op == "Conv":
            pads = a.get("pads", [0, 0, 0, 0])
            assert pads[:2] == pads[2:], "asymmetric pads"
            y = F.conv2d(x[0], x[1], x[2] if len(x) > 2 else None, stride=a.get("strides", [1, 1]),
                         padding=pads[:2], dilation=a.get("dilations", [1, 1]), groups=a.get("group", 1))
        elif op == "Relu":
            y = torch.relu(x[0])
        elif op == "MaxPool":
            pads = a.get("pads", [0, 0, 0, 0])
            y = F.max_pool2d(x[0], a["kernel_shape"], a.get("strides", a["kernel_shape"]), pads[:2],
                             ceil_mode=bool(a.get("ceil_mode", 0)))
        elif op == "GlobalAveragePool":
            y = x[0].mean(dim=(2, 3), keepdim=True)
        elif op == "Flatten":
            y = x[0].flatten(a.get("axis", 1))
        elif op == "Gemm":
            w = x[1].T if a.get("transB", 0) else x[1]
            y = x[0] @ w * a.get("alpha", 1.0) + (x[2] * a.get("beta", 1.0) if len(x) > 2 else 0)
        elif op == "Softmax":
            y = torch.softmax(x[0], dim=a.get("axis", -1))
        elif op == "Transpose":
            y = x[0].permute(*a["perm"])
        elif op == "QuantizeLinear":            # rounding with the straight-through gradient, as fake quantisation
            zp = x[2] if len(x) > 2 and x[2] is not None else torch.tensor(0, dtype=torch.uint8)
            lo, hi = (0, 255) if zp.dtype == torch.uint8 else (-128, 127)
            y = _StraightThrough.apply(x[0], x[1].float(), zp.float(), lo, hi)
        elif op == "DequantizeLinear":
            zp = x[2].float() if len(x) > 2 and x[2] is not None else torch.zeros(())
            scale = x[1]
            if scale.dim() == 1 and x[0].dim() > 1:       # per channel, along `axis`
                along = [1] * x[0].dim()
                along[a.get("axis", 1)] = -1
                scale, zp = scale.reshape(along), zp.reshape(along) if zp.dim() else zp
            y = (x[0].float() - zp) * scale
        elif op == "DynamicQuantizeLinear":     # ONNX's formula; the scale and zero point held (detached)
            v = x[0].detach()
            lo, hi = torch.clamp(v.min(), max=0), torch.clamp(v.max(), min=0)
            scale = (hi - lo) / 255
            zero = torch.clamp(torch.round(-lo / scale), 0, 255)
            env[node.output[1]], env[node.output[2]] = scale, zero
            y = _StraightThrough.apply(x[0], scale, zero, 0, 255)
        elif op in ("ConvInteger", "MatMulInteger"):
            a = x[0].float() - (x[2].float() if len(x) > 2 and x[2] is not None else 0.0)
            b = x[1].float()
            if len(x) > 3 and x[3] is not None:
                b = b - (x[3].float().reshape(-1, *[1] * (b.dim() - 1)) if op == "ConvInteger" else x[3].float())
            if op == "ConvInteger":
                a_attrs = _attrs(node)
                pads = node_pads(a_attrs)
                y = F.conv2d(a, b, stride=a_attrs.get("strides", [1, 1]), padding=pads, groups=a_attrs.get("group", 1))
            else:
                y = a @ b
        elif op == "Squeeze":
            y = x[0].squeeze(tuple(int(a) for a in x[1].tolist())) if len(x) > 1 else x[0].squeeze()
        elif op == "Cast":
            y = x[0].float()
        elif op in ("Add", "Mul", "Sub"):
            y = {"Add": torch.add, "Mul": torch.mul, "Sub": torch.sub}[op](x[0], x[1])
        elif op == "MatMul":
            y = x[0] @ x[1]
        elif op == "Reshape":
            y = x[0].reshape([int(d) if d != 0 else x[0].shape[i] for i, d in enumerate(x[1].tolist())])
        else:
            raise NotImplementedError(op)
        env[node.output[0]] = y
    return env


def node_pads(a: dict) -> list:
    pads = a.get("pads", [0, 0, 0, 0])
    assert pads[:2] == pads[2:], "asymmetric pads"
    return pads[:2]


class _StraightThrough(torch.autograd.Function):
    """round(x / s) + z clamped to [lo, hi]; backward: g / s where the unclamped value is within range.

    Per-tensor scale and zero point only. The quantised values stay float here (their integer
    type is irrelevant to the arithmetic that follows)."""

    @staticmethod
    def forward(ctx, x, s, z, lo, hi):
        grid = torch.round(x / s) + z
        ctx.save_for_backward(((grid >= lo) & (grid <= hi)).float(), s)
        return grid.clamp(lo, hi)

    @staticmethod
    def backward(ctx, g):
        inside, s = ctx.saved_tensors
        return g * inside / s, None, None, None, None
