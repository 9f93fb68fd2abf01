"""Whole networks: onnxsal's VJP graph against torch.autograd on the same weights.

Small versions of the architectures onnxsal targets (VGG, ResNet, MobileNetV2,
squeeze-excitation with hard activations, a ViT block) are exported with the
TorchScript exporter at batch 1, in eval mode, with BatchNorm kept as its own
node and random positive running statistics so folding it is not a no-op.
The derived graph must give the input gradient and the gradient at an inner
conv activation to 1e-4 of the largest gradient entry, at batch 1 and 4.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from gradcheck import run  # noqa: E402
from onnxsal.graph.autodiff import vjp  # noqa: E402
from onnxsal.graph.simplify import simplify  # noqa: E402

TOL = 1e-4


# ---- networks -------------------------------------------------------------------------------

def conv_bn(cin, cout, k=3, s=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class VGGish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(32, 10))
        self.probe = self.features[5]

    def forward(self, x):
        return self.classifier(self.features(x))


class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = conv_bn(cin, cout, s=stride)
        self.c2 = conv_bn(cout, cout, act=None)
        self.down = conv_bn(cin, cout, k=1, s=stride, act=None) if stride != 1 or cin != cout else None

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return torch.relu(self.c2(self.c1(x)) + idt)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, k=3, s=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = Basic(8, 8, 1)
        self.layer2 = Basic(8, 16, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        self.probe = self.layer2.c1[0]     # a conv whose output feeds a BatchNorm: blocks that fold

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.pool(self.stem(x)))))


class InvRes(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        self.block = nn.Sequential(conv_bn(cin, mid, k=1, act=nn.ReLU6),
                                   conv_bn(mid, mid, k=3, s=stride, groups=mid, act=nn.ReLU6),
                                   conv_bn(mid, cout, k=1, act=None))
        self.res = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.res else y


class MobileNetV2ish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, s=2, act=nn.ReLU6)
        self.blocks = nn.Sequential(InvRes(8, 8, 1, 4), InvRes(8, 12, 2, 4), InvRes(12, 12, 1, 4))
        self.head = nn.Sequential(conv_bn(12, 32, k=1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(0.2), nn.Linear(32, 10))
        self.probe = self.blocks[1].block[1]     # depthwise conv + BN + ReLU6: its post-ReLU6 output

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = self.gate(self.fc2(torch.relu(self.fc1(self.pool(x)))))
        return x * s


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, s=2, act=nn.Hardswish)
        self.se = SE(16)
        self.conv = conv_bn(16, 16, act=nn.Hardswish)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        self.probe = self.conv

    def forward(self, x):
        return self.head(self.conv(self.se(self.stem(x))))


class SpelledHardswish(nn.Module):
    """Hard-swish as paddle2onnx writes it: x * Clip(x + 3, 0, 6) / 6."""

    def forward(self, x):
        return x * F.relu6(x + 3) / 6


class KerasHardswish(nn.Module):
    """Hard-swish as tf2onnx writes Keras's: x * (Clip(x + 3, 0, 6) * (1/6))."""

    def forward(self, x):
        return x * (F.relu6(x + 3) * (1 / 6))


class SpelledSE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        s = self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * (F.relu6(s + 3) / 6)                      # a hard-sigmoid gate, spelled out


class SpelledHardNet(nn.Module):
    """MobileNetV3-style blocks whose hard activations are spelled out in elementwise ops, as
    exporters without a hard-swish op write them; onnxsal fuses each into a HardSigmoid."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, s=2, act=SpelledHardswish)
        self.se = SpelledSE(16)
        self.conv = conv_bn(16, 16, groups=16, act=KerasHardswish)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        self.probe = self.conv[0]

    def forward(self, x):
        return self.head(self.conv(self.se(self.stem(x))))


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)) * (d // self.h) ** -0.5
        a = a.softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, d))


class ViTish(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.1)
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)
        self.probe = self.patch

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(self.ln(x)[:, 0])


class Modern(nn.Module):
    """Ops beyond the classic CNNs: GroupNorm, Mish, pixel unshuffle/shuffle, einsum attention over
    positions, and a max over positions (amax) before the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.unshuffle = nn.PixelUnshuffle(2)
        self.mix = nn.Conv2d(64, 32, 1)
        self.shuffle = nn.PixelShuffle(2)
        self.head = nn.Linear(8, 10)
        self.probe = self.mix

    def forward(self, x):
        x = F.mish(self.gn(self.stem(x)))
        x = self.shuffle(self.mix(self.unshuffle(x)))
        t = F.avg_pool2d(x, 4).flatten(2)                                  # (b, c, n)
        att = torch.einsum("bcn,bcm->bnm", t, t).softmax(dim=-1)
        mixed = torch.einsum("bnm,bcm->bcn", att, t)
        return self.head(torch.amax(mixed, dim=2))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: ``chunk`` (Slice bounds read from the shape at run time), channel shuffle."""

    def __init__(self, c=24):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(conv_bn(h, h, 1), nn.Conv2d(h, h, 3, padding=1, groups=h), nn.BatchNorm2d(h),
                                    conv_bn(h, h, 1))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 24, 3, 2)
        self.units = nn.Sequential(ShuffleUnit(), ShuffleUnit())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))
        self.probe = self.stem[0]

    def forward(self, x):
        return self.head(self.units(self.stem(x)))


class WindowNet(nn.Module):
    """Swin's window attention: pads computed from the shape, a cyclic shift, windows, and a crop back."""

    def __init__(self, d=16, ws=3, heads=2):
        super().__init__()
        self.ws, self.h = ws, heads
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, 10)
        self.probe = self.patch

    def forward(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)                      # (b, H, W, d)
        b, hh, ww, d = x.shape
        ws = self.ws
        pad_b, pad_r = (ws - hh % ws) % ws, (ws - ww % ws) % ws
        y = F.pad(self.ln(x), (0, 0, 0, pad_r, 0, pad_b))
        y = torch.roll(y, shifts=(-1, -1), dims=(1, 2))
        ph, pw = y.shape[1], y.shape[2]
        win = y.view(b, ph // ws, ws, pw // ws, ws, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, d)
        q, k, v = self.qkv(win).reshape(win.shape[0], ws * ws, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (d // self.h) ** -0.5).softmax(dim=-1)
        o = self.proj((a @ v).transpose(1, 2).reshape(win.shape[0], ws * ws, d))
        o = o.view(b, ph // ws, pw // ws, ws, ws, d).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, d)
        o = torch.roll(o, shifts=(1, 1), dims=(1, 2))[:, :hh, :ww, :]
        return self.head((x + o).mean(dim=(1, 2)))


class TorchMHA(nn.Module):
    """nn.MultiheadAttention (sequence first, as torchvision's ViT): its export builds reshape
    targets that ONNX shape inference cannot follow, so the autodiff probes the ranks."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 8, 8)
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.head = nn.Linear(d, 10)
        self.probe = self.patch

    def forward(self, x):
        t = self.patch(x).flatten(2).permute(2, 0, 1)              # (tokens, b, d)
        y = self.ln(t)
        t = t + self.attn(y, y, y, need_weights=False)[0]
        return self.head(t.mean(dim=0))


class Copies(nn.Module):
    """Ops that copy elements by position (timm's TResNet, blur pools, GCViT, MViTv2): reflect,
    replicate and circular pads (the pads a chain of Concat/Slice/Transpose when exported without
    constant folding), a Tile whose repeats come from the batch size, and a slice assignment
    (ScatterND)."""

    def __init__(self, d=8):
        super().__init__()
        self.d = d
        self.c1 = nn.Conv2d(3, d, 3)
        self.reflect = nn.ReflectionPad2d((1, 2, 2, 1))
        self.replicate = nn.ReplicationPad2d(1)
        self.c2 = nn.Conv2d(d, d, 3)
        self.register_buffer("blur", torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0]))
                             .div(16).expand(d, 1, 3, 3).contiguous())
        self.q = nn.Parameter(torch.randn(1, d, 1, 1))
        self.head = nn.Linear(d, 10)
        self.probe = self.c1

    def forward(self, x):
        y = torch.tanh(self.c1(self.reflect(x)))
        y = self.c2(self.replicate(y))
        y = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="reflect"), self.blur, stride=2, groups=self.d)
        y = F.pad(y, (2, 1, 0, 0), mode="circular")
        y = y * torch.sigmoid(self.q.repeat(y.shape[0], 1, y.shape[2], 1))
        z = y.clone()
        z[:, :, 1:, :] = z[:, :, 1:, :] * 2 + y[:, :, :-1, :]
        return self.head(torch.tanh(z).mean(dim=(2, 3)))


class Selecting(nn.Module):
    """Top-k pooling (the k strongest responses of each channel), a triangular channel-similarity
    matrix and a cumulative sum over it."""

    def __init__(self, d=8):
        super().__init__()
        self.c1 = nn.Conv2d(3, d, 3, stride=2)
        self.head = nn.Linear(2 * d, 10)
        self.probe = self.c1

    def forward(self, x):
        f = torch.tanh(self.c1(x)).flatten(2)
        top = f.topk(5, dim=2).values.mean(-1)
        similar = torch.triu(f @ f.transpose(1, 2) / f.shape[2], diagonal=1)
        return self.head(torch.cat([top, similar.cumsum(-1)[..., -1]], 1))


class CeilPools(nn.Module):
    """Pools in ceil mode with padding whose last window would start in the end padding: PyTorch and
    ONNX Runtime drop it, ONNX's shape inference counts it (15 -> 8 and 7 -> 4 here, not 9 and 5)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2)
        self.pool1 = nn.MaxPool2d(2, 2, padding=1, ceil_mode=True)
        self.c2 = nn.Conv2d(8, 8, 2)
        self.pool2 = nn.AvgPool2d(2, 2, padding=1, ceil_mode=True, count_include_pad=True)
        self.head = nn.Linear(8 * 4 * 4, 10)
        self.probe = self.c2

    def forward(self, x):
        return self.head(self.pool2(torch.relu(self.c2(self.pool1(torch.relu(self.c1(x)))))).flatten(1))


class SameDilated(nn.Module):
    """``padding="same"`` with dilations, which torch.onnx writes as ``auto_pad=SAME_UPPER`` and ONNX
    Runtime refuses to run in that form (an even kernel too: its odd pad unit goes at the end)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding="same", dilation=2)
        self.c2 = nn.Conv2d(8, 8, 2, padding="same", dilation=3)
        self.head = nn.Linear(8, 10)
        self.probe = self.c2

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


class SqueezedIf(nn.Module):
    """``nn.LocalResponseNorm`` (AlexNet, GoogLeNet v1) and ``F.pad`` of an unsqueezed tensor: the
    TorchScript exporter writes their ``squeeze(1)`` as an If on a shape, whose branches read the
    tensor. Its gradient was silently zero; the If is now replaced by the branch its shapes fix."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.lrn = nn.LocalResponseNorm(3, alpha=0.5, beta=0.75, k=1.0)   # a large alpha: the norm matters
        self.head = nn.Linear(8, 10)
        self.probe = self.c1

    def forward(self, x):
        a = self.lrn(torch.relu(self.c1(x)))
        b = F.pad(a.unsqueeze(1), (0, 0, 0, 0, 1, 0)).squeeze(1)[:, 1:]
        return self.head((a * b).mean((2, 3)))


class WideCeilPools(CeilPools):
    """`CeilPools` whose windows keep their last, partly padded place (16 -> 9, 8 -> 5): exported at
    opset 9, which has no ceil mode, the max pool's end pad grows to its kernel's size."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 5 * 5, 10)


class FilledLike(nn.Module):
    """`torch.ones_like` and `full_like` as bounds and a gate: at opset 7 torch.onnx writes them as
    the experimental ConstantFill, which ONNX Runtime does not run."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)
        self.probe = self.c1

    def forward(self, x):
        a = self.c1(x)
        a = torch.max(torch.min(a, torch.full_like(a, 0.7)), -torch.ones_like(a)) * a
        return self.head(self.bn(a).mean((2, 3)))


NETS = {"vgg": VGGish, "resnet": ResNetish, "mobilenetv2": MobileNetV2ish, "se_hard": SENet, "vit": ViTish,
        "modern": Modern, "shuffle": ShuffleNetish, "window": WindowNet, "mha": TorchMHA,
        "copies": Copies, "spelled_hard": SpelledHardNet, "selecting": Selecting, "ceil_pools": CeilPools,
        "same_dilated": SameDilated, "squeezed_if": SqueezedIf, "ceil_pools_opset9": WideCeilPools,
        "filled_opset7": FilledLike}
# Mish is an op from opset 18; opset 9 has no ceil mode, so torch.onnx writes the ceil-mode pools
# with an end pad as large as their kernel, which ONNX Runtime refuses as it stands; at opset 7 it
# writes ones_like as ConstantFill
OPSET = {"modern": 18, "ceil_pools_opset9": 9, "filled_opset7": 7}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = NETS[name]()
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return net.eval()


def export(net: nn.Module, path, dynamic: bool = False, opset: int = 17) -> onnx.ModelProto:
    x = torch.randn(1, 3, 32, 32)
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=opset, dynamo=False,
                  training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    if dynamic:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), **kwargs)
    return onnx.load(str(path))


def probe_tensor(net: nn.Module, model: onnx.ModelProto) -> str:
    """ONNX name of the probe module's output: the k-th Conv's output, or its block's last output.

    The k-th conv module called in forward order is the k-th Conv node, since
    the exporter keeps call order for these straight-line networks.
    """
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in net.modules()
             if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    probe = net.probe
    if isinstance(probe, nn.Conv2d):
        return convs[order.index(probe)].output[0]
    # a conv_bn block: follow Conv -> BatchNormalization -> activation
    first = next(m for m in probe.modules() if isinstance(m, nn.Conv2d))
    name = convs[order.index(first)].output[0]
    for _ in range(len(probe) - 1):
        name = next(n for n in model.graph.node if name in n.input).output[0]
    return name


def torch_grads(net: nn.Module, x: np.ndarray, cot: np.ndarray):
    """logits, d<cot, logits>/d input and d<cot, logits>/d probe output, by torch.autograd."""
    store = {}

    def hook(mod, inp, out):
        out.retain_grad()
        store["probe"] = out

    h = net.probe.register_forward_hook(hook)
    xt = torch.tensor(x, requires_grad=True)
    y = net(xt)
    (y * torch.tensor(cot)).sum().backward()
    h.remove()
    return y.detach().numpy(), xt.grad.numpy(), store["probe"].grad.numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name: str, dynamic: bool = False):
        key = (name, dynamic)
        if key not in cache:
            net = build(name)
            model = export(net, tmp_path_factory.mktemp(name) / "m.onnx", dynamic, OPSET.get(name, 17))
            cache[key] = (net, model, probe_tensor(net, model))
        return cache[key]

    return get


CASES = [("vgg", False), ("resnet", False), ("mobilenetv2", False), ("se_hard", False), ("vit", False),
         ("vit", True), ("resnet", True), ("spelled_hard", False), ("modern", True), ("shuffle", True), ("window", True), ("mha", True),
         ("copies", False), ("copies", True), ("selecting", False), ("selecting", True), ("ceil_pools", False),
         ("ceil_pools", True), ("ceil_pools_opset9", False), ("ceil_pools_opset9", True), ("same_dilated", False),
         ("same_dilated", True), ("filled_opset7", False), ("filled_opset7", True),
         ("squeezed_if", False), ("squeezed_if", True)]


@pytest.mark.parametrize("name,dynamic", CASES, ids=[f"{n}{'-dyn' if d else ''}" for n, d in CASES])
def test_matches_torch_autograd(exported, name, dynamic):
    net, model, probe = exported(name, dynamic)
    vm = vjp(model, "logits", ["input", probe])
    onnx.checker.check_model(vm)
    rng = np.random.default_rng(7)
    # A static export of the ViT bakes batch 1 into the class-token Expand, so
    # even its forward pass only runs at batch 1; the dynamic export covers 4.
    batches = (1,) if (name, dynamic) == ("vit", False) else (1, 4)
    for batch in batches:
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        cot = rng.standard_normal((batch, 10)).astype(np.float32)
        y_t, gx_t, gp_t = torch_grads(net, x, cot)
        out = run(vm, {"input": x, "grad_logits": cot})
        assert rel_err(out["logits"], y_t) < TOL
        assert out["grad_input"].shape == gx_t.shape
        assert rel_err(out["grad_input"], gx_t) < TOL, f"input grad, batch {batch}"
        assert rel_err(out["grad_" + probe], gp_t) < TOL, f"probe grad, batch {batch}"


def test_modern_net_exercises_the_newer_rules(exported):
    """The export really contains the ops the "modern" case is there to check against autograd."""
    _, model, _ = exported("modern", True)
    ops = {n.op_type for n in model.graph.node}
    assert {"Einsum", "DepthToSpace", "ReduceMax", "InstanceNormalization", "Softplus"} <= ops
    d2s = next(n for n in model.graph.node if n.op_type == "DepthToSpace")
    assert helper.get_attribute_value(next(a for a in d2s.attribute if a.name == "mode")) == b"CRD"


def test_selecting_net_exercises_the_selecting_rules(exported):
    _, model, _ = exported("selecting", True)
    assert {"TopK", "Trilu", "CumSum"} <= {n.op_type for n in model.graph.node}


def test_copies_net_exercises_the_copying_rules(exported):
    """Its dynamic export has reflect and edge Pads whose amounts only fold through Shape and
    Transpose, a Tile whose repeats depend on the batch size, and a ScatterND."""
    _, model, _ = exported("copies", True)
    modes = {helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "Pad" for a in n.attribute}
    assert {b"reflect", b"edge"} <= modes
    inits = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                         for o in n.output}
    tile = next(n for n in model.graph.node if n.op_type == "Tile")
    assert tile.input[1] not in inits
    assert "ScatterND" in {n.op_type for n in model.graph.node}


def test_opset9_ceil_pools_have_pads_as_wide_as_their_kernels(exported):
    """The case above is there for these pools: the file's own form does not load in ONNX Runtime."""
    _, model, _ = exported("ceil_pools_opset9", True)
    attrs = [(n.op_type, {a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in model.graph.node]
    wide = [op for op, a in attrs if op in ("MaxPool", "AveragePool") and max(a.get("pads", [0])) >= a["kernel_shape"][0]]
    assert wide == ["MaxPool"]
    with pytest.raises(Exception, match="Pad should be smaller than kernel"):
        run(model, {"input": np.zeros((1, 3, 32, 32), np.float32)})


def test_opset7_export_fills_with_constant_fill(exported):
    _, model, _ = exported("filled_opset7", True)
    assert sum(n.op_type == "ConstantFill" for n in model.graph.node) == 2


def test_mobilenet_covers_strided_depthwise_path(exported):
    """The 32-channel stride-2 depthwise layer takes the zero-interleave path, so the torch check above covers it."""
    net, model, probe = exported("mobilenetv2")
    vm = vjp(model, "logits", ["input"])
    spread = [n for n in vm.graph.node if n.op_type == "ConvTranspose"
              and [a.ints for a in n.attribute if a.name == "kernel_shape"] == [[1, 1]]]
    assert len(spread) == 1


def test_without_simplify_same_gradients(exported):
    """Folding BatchNorm into Conv changes cost, not values."""
    net, model, probe = exported("resnet")
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    cot = np.random.default_rng(4).standard_normal((2, 10)).astype(np.float32)
    a = run(vjp(model, "logits", ["input"]), {"input": x, "grad_logits": cot})["grad_input"]
    b = run(vjp(model, "logits", ["input"], simplify=False), {"input": x, "grad_logits": cot})["grad_input"]
    assert rel_err(a, b) < TOL


def test_extra_outputs_are_forward_activations(exported):
    net, model, probe = exported("mobilenetv2")
    vm = vjp(model, "logits", ["input"], outputs=[probe])
    assert [o.name for o in vm.graph.output] == ["logits", probe, "grad_input"]
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    out = run(vm, {"input": x, "grad_logits": np.ones((2, 10), np.float32)})
    store = {}
    def keep(mod, inp, o):
        store["a"] = o.detach().numpy()

    h = net.probe.register_forward_hook(keep)
    with torch.no_grad():
        net(torch.tensor(x))
    h.remove()
    assert rel_err(out[probe], store["a"]) < TOL


# ---- simplify --------------------------------------------------------------------------------

def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_simplify_folds_bn_and_keeps_names(exported):
    net, model, probe = exported("resnet")
    from onnxsal.graph.normalize import normalize

    m = normalize(model)
    s = simplify(m)
    assert "BatchNormalization" in _ops(m) and "BatchNormalization" not in _ops(s)
    bn_outs = {n.output[0] for n in m.graph.node if n.op_type == "BatchNormalization"}
    assert bn_outs <= {o for n in s.graph.node for o in n.output}     # post-BN names survive
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert rel_err(run(s, {"input": x})["logits"], run(m, {"input": x})["logits"]) < 1e-5
    # a requested pre-BN conv output blocks that one fold only
    kept = simplify(m, keep=[probe])
    assert _ops(kept).count("BatchNormalization") == 1
    assert probe in {o for n in kept.graph.node for o in n.output}


def _tiny(nodes, inits=()):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_simplify_removes_identity_and_dropout_keeping_requested_names():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["i"]),
             helper.make_node("Dropout", ["i"], ["d"]), helper.make_node("Identity", ["d"], ["y"])]
    m = _tiny(nodes)
    s = simplify(m)
    assert _ops(s) == ["Relu"] and s.graph.node[0].output[0] == "y"
    s = simplify(m, keep=["i"])          # i and y both kept: the Relu takes i's name, one Identity stays
    assert _ops(s) == ["Relu", "Identity"] and s.graph.node[0].output[0] == "i"
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    vm = vjp(m, "y", ["x", "i"])
    out = run(vm, {"x": x, "grad_y": np.ones_like(x)})
    np.testing.assert_array_equal(out["grad_x"], (x > 0).astype(np.float32))
    np.testing.assert_array_equal(out["grad_i"], np.ones_like(x))


def test_simplify_bn_after_shared_conv_weight_is_not_mutated():
    """Two convs share one weight; folding the BN after one must not change the other."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((2, 2, 1, 1)).astype(np.float32), "w")
    stats = [numpy_helper.from_array((rng.random(2) + 0.5).astype(np.float32), n) for n in ("sc", "bi", "mu", "va")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"]), helper.make_node("BatchNormalization",
                                                                            ["c1", "sc", "bi", "mu", "va"], ["b1"]),
             helper.make_node("Conv", ["x", "w"], ["c2"]), helper.make_node("Add", ["b1", "c2"], ["y"])]
    m = _tiny(nodes, [w, *stats])
    s = simplify(m)
    assert "BatchNormalization" not in _ops(s)
    x = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    assert rel_err(run(s, {"x": x})["y"], run(m, {"x": x})["y"]) < 1e-5


def _scaled_conv(op: str, shape: tuple, bias: bool = True, extra_reader: bool = False):
    """Conv(2 -> 3) then ``op`` with a constant of ``shape``, then a Relu: tf2onnx's form of a Keras
    batch norm's scale (``Mul`` by a (1, C, 1, 1) constant) among others."""
    rng = np.random.default_rng(len(shape) + 7 * bias)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, shape).astype(np.float32), "k")]
    conv_in = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1]), helper.make_node(op, ["c", "k"], ["s"]),
             helper.make_node("Relu", ["s"], ["r" if extra_reader else "y"])]
    if extra_reader:
        nodes.append(helper.make_node("Add", ["r", "c"], ["y"]))
    return _tiny(nodes, inits)


@pytest.mark.parametrize("shape,bias", [((1, 3, 1, 1), True), ((3, 1, 1), False), ((), True), ((1,), False)])
def test_simplify_folds_a_scale_per_channel_after_a_conv(shape, bias):
    """The constant goes into the Conv's weights and bias; the Conv takes the Mul's output name, and
    the values and the input gradient stay the same to float rounding."""
    op = "Mul"
    m = _scaled_conv(op, shape, bias)
    s = simplify(m)
    assert _ops(s) == ["Conv", "Relu"] and s.graph.node[0].output[0] == "s"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 4, 4)).astype(np.float32)
    assert rel_err(run(s, {"x": x})["y"], run(m, {"x": x})["y"]) < 1e-6
    cot = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    got = run(vjp(m, "y", ["x"]), {"x": x, "grad_y": cot})["grad_x"]
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    w, k = (torch.tensor(numpy_helper.to_array(t), dtype=torch.float64) for t in m.graph.initializer[:2])
    b = torch.tensor(numpy_helper.to_array(m.graph.initializer[2]), dtype=torch.float64) if bias else None
    c = torch.nn.functional.conv2d(xt, w, b, padding=1)
    y = torch.relu(c * k)
    (y * torch.tensor(cot, dtype=torch.float64)).sum().backward()
    assert rel_err(got, xt.grad.numpy()) < 1e-5


@pytest.mark.parametrize("case", ["width vector", "second reader", "kept", "spatial", "sum"])
def test_simplify_leaves_a_conv_whose_output_is_not_only_scaled_per_channel(case):
    """A (C,) vector broadcasts along the width, not the channels; a Conv output read elsewhere or
    asked for by name keeps its value; a constant over the spatial axes is no per-channel scale;
    a sum stays (its backward passes the gradient through, and ONNX Runtime fuses it forward)."""
    shape = {"width vector": (4,), "spatial": (1, 1, 4, 4)}.get(case, (1, 3, 1, 1))
    op = "Add" if case == "sum" else "Mul"
    m = _scaled_conv(op, shape, extra_reader=case == "second reader")
    s = simplify(m, keep=["c"] if case == "kept" else ())
    assert op in _ops(s)
    x = np.random.default_rng(2).standard_normal((1, 2, 4, 4)).astype(np.float32)
    assert rel_err(run(s, {"x": x})["y"], run(m, {"x": x})["y"]) < 1e-6


def test_simplify_fuses_spelled_out_hard_activations(exported):
    """The three spelled-out hard activations (paddle's and Keras's hard-swish, a hard-sigmoid
    gate) each become one HardSigmoid; the values change only by float rounding."""
    from onnxsal.graph.normalize import normalize

    net, model, probe = exported("spelled_hard")
    m = normalize(model)
    s = simplify(m)
    assert _ops(m).count("Clip") == 3 and "HardSigmoid" not in _ops(m)
    assert _ops(s).count("HardSigmoid") == 3 and not {"Clip", "Div"} & set(_ops(s))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert rel_err(run(s, {"input": x})["logits"], run(m, {"input": x})["logits"]) < 1e-5
    assert "HardSigmoid" in _ops(vjp(model, "logits", ["input"]))


def test_engine_forward_graphs_are_simplified(exported):
    """Plain forward passes (Score-CAM, RISE, occlusion, target picking) run the fused graph too,
    and give the raw model's values to float rounding."""
    from onnxsal.engine import Engine
    from onnxsal.model import load
    from onnxsal.runtime import Runtime

    net, model, probe = exported("spelled_hard")
    rt = Runtime("cpu")
    built = []
    session = rt.session
    rt.session = lambda key, build: session(key, lambda: built.append(build()) or built[-1])
    m = load(model)
    engine = Engine(m, rt)
    x = np.random.default_rng(8).standard_normal((3, 3, 32, 32)).astype(np.float32)
    logits, acts = engine.outputs(x, [m.logits, probe])
    again, = engine.outputs_given(probe, acts, x[:1], [m.logits])
    assert all(_ops(g).count("HardSigmoid") >= 1 and "Clip" not in _ops(g) for g in built) and len(built) == 2
    with torch.no_grad():
        ref = net(torch.tensor(x)).numpy()
    assert rel_err(logits, ref) < 1e-5 and rel_err(again, ref) < 1e-5


def _consts(**values):
    return [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in values.items()]


SPELLED_SWISH = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
                 helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])]


def test_spelled_hard_swish_keeps_its_derivative_at_the_kinks():
    """x * Clip(x + 3, 0, 6) / 6, fused, against its exact derivative: 0 up to x = -3, (2x + 3)/6
    strictly inside, 1 from x = 3 on (a Clip's one-sided values, as the unfused rules give)."""
    m = _tiny(SPELLED_SWISH, _consts(three=3.0, zero=0.0, six=6.0))
    x = np.random.default_rng(1).uniform(-5, 5, (2, 2, 4, 4)).astype(np.float32)
    x.flat[:6] = [-3.0, 3.0, 0.0, -2.5, 2.5, -6.0]
    g = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    vm = vjp(m, "y", ["x"])
    assert "HardSigmoid" in _ops(vm) and "Clip" not in _ops(vm)
    out = run(vm, {"x": x, "grad_y": g})
    x64 = x.astype(np.float64)
    slope = np.where(x64 <= -3, 0.0, np.where(x64 >= 3, 1.0, (2 * x64 + 3) / 6))
    np.testing.assert_allclose(out["grad_x"], g * slope, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["y"], x64 * np.clip(x64 + 3, 0, 6) / 6, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["kept", "bounds", "shared", "other_factor", "rank", "double"])
def test_simplify_leaves_hard_activations_it_cannot_fuse(case):
    """A kept or shared intermediate, other bounds, a product with another tensor, a constant
    that raises the rank by broadcasting, or a double tensor (ONNX Runtime has no double
    HardSigmoid) stay as written."""
    nodes, inits = [n for n in SPELLED_SWISH], _consts(three=3.0, zero=0.0, six=6.0, five=5.0)
    if case == "rank":
        inits[0] = numpy_helper.from_array(np.full((1, 1, 1, 1, 1), 3.0, np.float32), "three")
    keep = ["c"] if case == "kept" else []
    if case == "bounds":
        nodes[1] = helper.make_node("Clip", ["a", "zero", "five"], ["c"])
    if case == "shared":
        nodes[3] = helper.make_node("Div", ["m", "six"], ["d"])
        nodes.append(helper.make_node("Add", ["d", "a"], ["y"]))
    if case == "other_factor":
        nodes[2] = helper.make_node("Mul", ["c", "c"], ["m"])
    m = _tiny(nodes, inits)
    if case == "double":
        for t in list(m.graph.input) + list(m.graph.output):
            t.type.tensor_type.elem_type = TensorProto.DOUBLE
        for k, init in enumerate(m.graph.initializer):
            m.graph.initializer[k].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
        from onnxsal.graph.normalize import normalize
        m = normalize(m)
    s = simplify(m, keep=keep)
    assert "HardSigmoid" not in _ops(s) and "Clip" in _ops(s)
    if case == "double":
        x = np.random.default_rng(3).uniform(-5, 5, (1, 2, 4, 4))
        out = run(vjp(m, "y", ["x"]), {"x": x, "grad_y": np.ones_like(x)})
        np.testing.assert_allclose(out["y"], x * np.clip(x + 3, 0, 6) / 6, rtol=1e-12)


# ---- cross-check with the onnx-ad package ------------------------------------------------------

@pytest.mark.parametrize("name", ["vgg", "resnet", "mobilenetv2", "se_hard", "vit"])
def test_cross_check_onnx_ad(exported, name):
    """onnx-ad's reverse graph, where it can differentiate the network (see the skip reason where not)."""
    onnx_ad = pytest.importorskip("onnx_ad")
    net, model, probe = exported(name)
    x = np.random.default_rng(11).standard_normal((1, 3, 32, 32)).astype(np.float32)
    cot = np.random.default_rng(12).standard_normal((1, 10)).astype(np.float32)
    try:
        ref = onnx_ad.reverse(model, inputs=["input"], outputs=["logits"], layout="onnx")
        ins = {i.name: i for i in ref.graph.input}
        seed = next(n for n in ins if n not in ("input",))
        rank = len(ins[seed].type.tensor_type.shape.dim)
        feeds = {"input": x, seed: cot[..., None] if rank == cot.ndim + 1 else cot}   # one seed direction
        res = run(ref, feeds)
        gref = next(v for k, v in res.items() if k.endswith("input") and k != "input").reshape(x.shape)
    except Exception as exc:  # pragma: no cover - depends on the other package's coverage
        pytest.skip(f"onnx-ad cannot differentiate this model: {type(exc).__name__}: {exc}")
    ours = run(vjp(model, "logits", ["input"]), {"input": x, "grad_logits": cot})["grad_input"]
    assert rel_err(ours, gref) < TOL
