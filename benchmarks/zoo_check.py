"""The input gradient of standard classifiers, onnxsal's VJP graph against the framework's own autodiff.

    .venv-bench/bin/python benchmarks/zoo_check.py [--nets resnet18,swin_t,...]      # torchvision
    .venv-bench/bin/python benchmarks/zoo_check.py --dynamo   # torch.onnx's dynamo exporter (needs onnxscript)
    .venv/bin/python benchmarks/zoo_check.py --keras [--nets MobileNetV3Small,...]   # Keras applications

Each network has random weights (calibrated batch-norm statistics, zero-initialised heads given
small random weights so the gradient is not zero), is exported with torch.onnx (TorchScript
exporter at opset 17, or with ``--dynamo`` the dynamo exporter, torch's default since 2.9; dynamic batch) or converted by `converters/keras.py`, and its VJP graph runs in ONNX
Runtime on three seeded inputs of batch 2 with a random cotangent on the logits. The printed
figure is max |onnxsal - reference| / max |reference| per seed.

A correct gradient can still disagree where the function has a kink or a tie, if the two
engines' forward passes round differently: ONNX Runtime may compute two neighbouring values of
a max-pool plateau bit-identical where PyTorch's differ in the last bit (GoogLeNet's chained
max pools make such plateaus on every input), or a pre-activation within rounding of zero may
fall on different sides of a ReLU. Each engine then routes the gradient by its own forward
values. Such cases show as errors that come and go with the seed; a wrong rule shows on every
seed. Traced layer by layer: GoogLeNet's gap opens at a 3x3 stride-1 max pool over a plateau that
ONNX Runtime computes exactly tied and PyTorch one ulp apart; Inception-v3's at one stem ReLU whose
pre-activation is within rounding of zero; on DenseNet-121 PyTorch's float32 gradient is as far from
its own float64 one (onnxsal's matches float64 to 7e-7 where PyTorch's float32 is 4e-3 off).

One smooth case: Keras EfficientNetV2-B0 differs by 3-6e-4 on every seed, and the gap opens at
the swish after ``top_bn``, whose pre-activations are large there. A sigmoid's derivative y(1 - y),
the formula PyTorch's and TensorFlow's own backward passes use too, loses precision to cancellation
when y is close to 1, so a one-ulp difference between two engines' forward sigmoid shows as about
1e-3 in that term. The gradients just above it agree to 1e-7.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from onnxsal.graph.autodiff import vjp  # noqa: E402
from onnxsal.graph.weights import attach  # noqa: E402

TORCHVISION = ("resnet18,resnext50_32x4d,densenet121,squeezenet1_1,googlenet,inception_v3,mobilenet_v3_small,"
               "mobilenet_v3_large,mnasnet0_5,shufflenet_v2_x0_5,efficientnet_b0,efficientnet_v2_s,regnet_y_400mf,"
               "regnet_x_400mf,convnext_tiny,swin_t,swin_v2_t,vit_b_16,maxvit_t")
KERAS = ("MobileNetV3Small,MobileNetV3Large,DenseNet121,Xception,ResNet50V2,NASNetMobile,InceptionResNetV2,"
         "EfficientNetB0,EfficientNetV2B0,ConvNeXtTiny")
SEEDS = (0, 1, 2)


def vjp_session(model: onnx.ModelProto, x_name: str, y_name: str) -> ort.InferenceSession:
    g = attach(vjp(model, y_name, [x_name]))
    return ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def torchvision_errors(name: str, cache: str, dynamo: bool = False) -> list[float]:
    import torch

    from common import torch_net

    net = torch_net(name)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2 and not p.abs().sum():       # ViT's zero-initialised head
                p.normal_(0, 0.02)
    if hasattr(net, "aux_logits"):
        net.aux_logits = False
    size = 224 if name.startswith(("vit", "maxvit", "swin")) else (160 if "inception" in name else 128)
    path = os.path.join(cache, f"zoo_{name}_{size}{'_dynamo' if dynamo else ''}.onnx")
    if not os.path.exists(path) and dynamo:
        prog = torch.onnx.export(net, (torch.randn(2, 3, size, size),), dynamo=True, input_names=["image"],
                                 output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N", min=1, max=64)},))
        prog.save(path)
    elif not os.path.exists(path):
        torch.onnx.export(net, (torch.randn(1, 3, size, size),), path, input_names=["image"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}})
    sess = vjp_session(onnx.load(path), "image", "logits")
    errs = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        cot = rng.standard_normal((2, 1000)).astype(np.float32)
        got = sess.run(["grad_image"], {"image": x, "grad_logits": cot})[0]
        xt = torch.tensor(x, requires_grad=True)
        (net(xt) * torch.tensor(cot)).sum().backward()
        errs.append(rel(got, xt.grad.numpy()))
    return errs


def keras_errors(name: str, cache: str) -> list[float]:
    from converters import keras as kc
    from onnxsal.model import load

    tf, keras = kc.import_tensorflow()
    keras.utils.set_random_seed(0)
    size = 96
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10,
                                              classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and len(layer.get_weights()) == 4:
            g, b, mu, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape).astype("f"), rng.normal(0, .1, b.shape).astype("f"),
                               rng.normal(0, .1, mu.shape).astype("f"), rng.uniform(.5, 1.5, var.shape).astype("f")])
    path = os.path.join(cache, f"zoo_keras_{name}_{size}.onnx")
    kc.convert(model, path, preprocess="raw")
    m = load(path)
    sess = vjp_session(m.proto, m.input.name, m.logits)
    errs = []
    for seed in SEEDS:
        r = np.random.default_rng(seed)
        x = r.standard_normal((2, size, size, 3)).astype(np.float32)
        cot = r.standard_normal((2, 10)).astype(np.float32)
        got = sess.run([f"grad_{m.input.name}"], {m.input.name: x, f"grad_{m.logits}": cot})[0]
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            score = tf.reduce_sum(model(xt, training=False) * cot)
        errs.append(rel(got, tape.gradient(score, xt).numpy()))
    return errs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keras", action="store_true", help="Keras applications through converters/keras.py")
    ap.add_argument("--dynamo", action="store_true", help="torchvision through torch.onnx's dynamo exporter")
    ap.add_argument("--nets", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cache = os.path.join(HERE, ".cache")
    os.makedirs(cache, exist_ok=True)
    nets = (args.nets or (KERAS if args.keras else TORCHVISION)).split(",")
    check = keras_errors if args.keras else (lambda n, c: torchvision_errors(n, c, args.dynamo))
    print(f"# {'Keras (tf.GradientTape)' if args.keras else 'torchvision (torch.autograd)'}"
          f"{', dynamo exporter' if args.dynamo else ''}: "
          f"max|onnxsal - reference| / max|reference|, seeds {SEEDS}")
    print("| network | " + " | ".join(f"seed {s}" for s in SEEDS) + " | s |")
    print("|---|" + "---|" * (len(SEEDS) + 1))
    for name in nets:
        t0 = time.perf_counter()
        try:
            errs = check(name, cache)
            cells = " | ".join(f"{e:.1e}" for e in errs)
        except Exception as exc:      # report and go on: the table is the point
            cells = f"failed: {type(exc).__name__}: {str(exc)[:160]}" + " |" * (len(SEEDS) - 1)
        print(f"| {name} | {cells} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
