"""The input gradient of standard classifiers, onnxsal's VJP graph against the framework's own autodiff.

    .venv-bench/bin/python benchmarks/zoo_check.py [--nets resnet18,swin_t,...]      # torchvision
    .venv-bench/bin/python benchmarks/zoo_check.py --dynamo   # torch.onnx's dynamo exporter (needs onnxscript)
    .venv/bin/python benchmarks/zoo_check.py --keras [--nets MobileNetV3Small,...]   # Keras applications
    .venv-bench/bin/python benchmarks/zoo_check.py --timm [--dynamo] [--nets tresnet_m:224,...]   # timm
    .venv-bench/bin/python benchmarks/zoo_check.py --ppocr      # PP-OCR's trained paddle2onnx models
    .venv-bench/bin/python benchmarks/zoo_check.py --half [--nets ...]   # torchvision, converted to float16
    .venv-bench/bin/python benchmarks/zoo_check.py [--timm] [--dynamo] --ort-optimized   # as ONNX Runtime saves them
    .venv-bench/bin/python benchmarks/zoo_check.py --qdq [--nets ...]   # torchvision, quantised to int8 (QDQ)
    .venv-bench/bin/python benchmarks/zoo_check.py --qoperator [--nets ...]   # the same, QOperator form
    .venv-bench/bin/python benchmarks/zoo_check.py --dynamic [--nets ...]     # dynamically quantised
    .venv-bench/bin/python benchmarks/zoo_check.py --static [--batch 4] [--dynamo]   # a fixed batch, checked at 2
    .venv/bin/python benchmarks/zoo_check.py --keras --static [--batch 4]   # tf2onnx's own call at a fixed batch
    .venv-bench/bin/python benchmarks/zoo_check.py --opset 9 [--nets ...]     # an older opset (TorchScript exporter)
    .venv-bench/bin/python benchmarks/zoo_check.py --hf [--dynamo] [--static]   # Hugging Face transformers' classifiers
    .venv-bench/bin/python benchmarks/zoo_check.py --hf --detection   # Hugging Face's DETR-style detectors
    .venv/bin/python benchmarks/zoo_check.py --keras --keras-export   # Keras 3's own model.export(format="onnx")
    .venv-bench/bin/python benchmarks/zoo_check.py --simplifier onnxsim [--static]   # as onnxsim/onnxslim/onnxoptimizer rewrite them
    .venv-bench/bin/python benchmarks/zoo_check.py --ultralytics [--final]   # YOLOv8/YOLO11 as Ultralytics exports them

Each network has random weights (calibrated batch-norm statistics, zero-initialised heads given
small random weights so the gradient is not zero), is exported with torch.onnx (TorchScript
exporter at opset 17, or with ``--dynamo`` the dynamo exporter, torch's default since 2.9; dynamic batch) or converted by `converters/keras.py`; ``--timm`` takes timm's architectures (10 classes,
TorchScript exporter, timm's fused attention off since that exporter cannot take it). Its VJP graph runs in ONNX
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

``--ppocr`` takes the trained PaddlePaddle models that the rapidocr-onnxruntime wheel ships
(paddle2onnx, opset 11 and 12): PP-OCR's text-angle classifier, DBNet text detector and SVTR
recogniser. No framework of theirs runs here, so the reference is onnx2torch's conversion of the
same file (an independent implementation of each op in PyTorch) and torch.autograd, in float64
so that the reference itself is exact; the cotangent is on the model's output.

``--half`` converts each torchvision export with onnxconverter-common's ``convert_float_to_float16``
(the whole network, input and output included), which onnxsal explains in float32. Its gradient is
then that of the network with float16-rounded weights, not of torch's own, so the table gives three
figures per seed: the largest difference of the lifted model's logits from ONNX Runtime running the
float16 file (is it the same model?), the relative difference of its input gradient from
torch.autograd's on the float32 network, and the Pearson correlation of the two gradients.

``--ort-optimized`` takes each torchvision or timm export as ONNX Runtime saves it from a session at
the extended optimisation level (``optimized_model_filepath``): convolutions fused with their
activations into ``com.microsoft`` ``FusedConv``, SiLU into ``QuickGelu``, GELU into ``Gelu`` or
``BiasGelu``, scaled and transposed products into ``FusedMatMul``, residual layer norms into
``SkipLayerNormalization``. onnxsal writes those back as standard ops when it loads the file
(``onnxsal/graph/contrib.py``); the reference is still torch.autograd on the network.

``--qdq`` quantises each torchvision export to int8 with ONNX Runtime's static quantiser (QDQ form,
calibrated on eight seeded random images), which onnxsal differentiates straight through its
quantisers. The table gives three figures per seed: the largest difference of onnxsal's logits
(the VJP graph's) from ONNX Runtime running the quantised file with its optimiser off, where each
QuantizeLinear and DequantizeLinear computes what the ONNX spec says (is it the same model?); the
difference of ONNX Runtime's default run, whose fused integer kernels round differently, from the
same (how far the deployed model is from its own spec); and the Pearson correlation of the
straight-through input gradient with torch.autograd's on the float network, a different function. ``--qoperator`` quantises to
the QOperator form (``QLinearConv``...), which onnxsal rewrites into QDQ form at load. ``--dynamic``
quantises with ``quantize_dynamic`` (``DynamicQuantizeLinear``, ``ConvInteger``, ``MatMulInteger``),
rewritten the same way with each input's grid held.

``--hf`` takes Hugging Face transformers' image classifiers (``<Name>ForImageClassification``), each
built from its default configuration with random weights: no hub download. Transformer stacks are cut
to at most 2 layers and each stage to 1 block (ConvNeXt and CvT keep theirs, whose configurations tie
the counts to other fields), convolutions get He-normal weights and batch norms the zoo's statistics
(transformers' own 0.02-deviation initialisation leaves a deep convolutional stack with gradients
near 1e-20), with 10 labels. The wrapper returns ``.logits``. Random weights put many ReLU6 and max-pool
inputs within rounding of a kink, so the reference is torch.autograd in float64 on the same network,
and each cell gives two figures: onnxsal's float32 gradient against float64, and PyTorch's own float32
gradient against float64. Where the two are of the same size, or onnxsal's is the smaller, the gap is
float32 rounding at kinks (each engine routes the gradient by its own forward values); a wrong rule
would show as onnxsal's figure alone far above PyTorch's on every seed. EfficientNet is left out: at
random weights its float32 gradient (about 1e11) is off its float64 one by more than 100 % in both
engines, and its default configuration is B7's.

``--keras-export`` takes the file Keras 3 writes itself with ``model.export(path, format="onnx")``
(tf2onnx under the TensorFlow backend, dynamic batch) instead of ``converters/keras.py``.

``--simplifier`` rewrites each torchvision export with onnx-simplifier, onnxslim or onnxoptimizer
(defaults) and loads the result as the engine does. ``--ultralytics`` builds each Ultralytics model
from its YAML (random weights), exports it with Ultralytics' own ``export(format="onnx")`` (onnxslim,
a static batch of 1) and compares against torch.autograd on the fused network it exported, with a
random cotangent on the whole first output. ``--yolov5`` and ``--yolox`` build those packages' own
models (random weights) and export them as their export scripts do; the output must read as anchors
with objectness, and the cotangent is on the objectness x class confidences onnxsal adds to the
graph (``make bench-env`` puts both packages in folders of their own under ``.venv-bench``).

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
import warnings

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
# timm: architectures whose ops go beyond torchvision's (reflect pads, slice assignment, run-time
# Tile, relative position biases, outlook/halo/pooling attention...), at the size timm builds them for.
TIMM = ("ecaresnet26t:128,skresnet18:128,res2net50_14w_8s:128,dla34:128,cspdarknet53:128,rexnet_100:128,"
        "ghostnetv2_100:128,lcnet_050:128,tresnet_m:224,densenetblur121d:128,resnest14d:128,ese_vovnet19b_dw:128,"
        "hrnet_w18_small:128,dpn68b:128,inception_v4:160,xception41:160,tf_efficientnet_b0:128,regnetz_005:128,"
        "dm_nfnet_f0:128,repvgg_a0:128,mobileone_s0:128,resnetv2_50x1_bit:128,efficientnet_b0_gn:128,"
        "mobilenetv4_hybrid_medium:256,mobilevit_xxs:256,mobilevitv2_050:256,efficientformerv2_s0:224,levit_128s:224,"
        "deit_tiny_patch16_224:224,cait_xxs24_224:224,xcit_nano_12_p16_224:224,convit_tiny:224,pit_ti_224:224,"
        "twins_svt_small:224,coat_lite_tiny:224,poolformer_s12:128,botnet26t_256:256,lambda_resnet26t:256,"
        "edgenext_xx_small:256,mvitv2_tiny:224,focalnet_tiny_srf:224,gcvit_xxtiny:224,mixer_s16_224:224,"
        "resmlp_12_224:224,convnextv2_atto:128,efficientvit_b0:224,efficientvit_m0:224,fastvit_t8:256,"
        "tiny_vit_5m_224:224,hiera_tiny_224:224,davit_tiny:224,inception_next_tiny:224,starnet_s1:224,"
        "mambaout_femto:224,hgnetv2_b0:224,nextvit_small:224,crossvit_tiny_240:240,tnt_s_patch16_224:224,"
        "beit_base_patch16_224:224,eva02_tiny_patch14_224:224,vit_small_patch16_rope_224:224,"
        "vit_relpos_small_patch16_224:224,vit_tiny_r_s16_p8_224:224,coatnet_nano_rw_224:224,"
        "maxxvitv2_nano_rw_256:256,caformer_s18:224,pvt_v2_b0:224,swinv2_cr_tiny_224:224,nest_tiny:224,"
        "rdnet_tiny:224,vitamin_small_224:224,visformer_tiny:224,sequencer2d_s:224")
PPOCR_NETS = "ppocr_cls,ppocr_det,ppocr_rec"
# Hugging Face transformers: <Name>ForImageClassification with <Name>Config's defaults (see --hf)
# Ultralytics: YOLOv8 / YOLO11 classifiers, detectors, segmenters and pose models from their YAMLs
# RTDetr is left out: at random weights PyTorch's own float32 and float64 gradients differ by 100 %
HF_DETECTION = "Detr,ConditionalDetr,DabDetr,TableTransformer,DeformableDetr,Yolos"
ULTRALYTICS_FINAL = "yolov8n:nms,yolo11n:nms,yolo26n:nms,yolo26n:e2e,yolov10n:e2e"
YOLOV5 = "yolov5n,yolov5s,yolov5n-seg,yolov5s-seg"
YOLOX_NETS = "yolox_nano:raw,yolox_tiny:raw,yolox_s:raw,yolox_nano:decoded,yolox_s:decoded"
ULTRALYTICS = ("yolov8n-cls,yolo11n-cls,yolov8n,yolo11n,yolov8n-seg,yolo11n-seg,yolov8n-pose,yolo11n-pose,yolov8n-obb,"
               "yolo11n-obb")
HF = ("ViT,DeiT,Beit,Data2VecVision,Dinov2,Dinov2WithRegisters,IJepa,ViTMSN,ConvNext,ConvNextV2,Swin,Swinv2,"
      "DonutSwin,Cvt,FocalNet,Levit,Pvt,PvtV2,Segformer,PoolFormer,SwiftFormer,MobileViT,MobileViTV2,ResNet,RegNet,"
      "Bit,HGNetV2,MobileNetV1,MobileNetV2,PPLCNet,TextNet")
SEEDS = (0, 1, 2)
ORT_OPTIMIZED = False     # --ort-optimized
ONE_ROW: set = set()      # static exports that ran one row per run (their batch could not be freed)
STATIC = False            # --static: exported at batch 1 without a dynamic batch, checked at batch 2 all the same
STATIC_BATCH = 1          # --static --batch 4: the fixed batch the file is exported at
OPSET = None              # --opset: the dynamo exporter's opset (its default otherwise)
KERAS_EXPORT = False      # --keras-export: Keras 3's own model.export(format="onnx")
SIMPLIFIER = None         # --simplifier onnxsim|onnxslim|onnxoptimizer: the export as that tool rewrites it


def vjp_session(model: onnx.ModelProto, x_name: str, y_name: str) -> ort.InferenceSession:
    g = attach(vjp(model, y_name, [x_name]))
    return ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def torchvision_net(name: str):
    """A torchvision classifier as the zoo check takes it: random weights, no zero head, no aux logits."""
    import torch

    from common import torch_net

    net = torch_net(name)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2 and not p.abs().sum():       # ViT's zero-initialised head
                p.normal_(0, 0.02)
    if hasattr(net, "aux_logits"):
        net.aux_logits = False
    return net


def torchvision_size(name: str) -> int:
    return 224 if name.startswith(("vit", "maxvit", "swin")) else (160 if "inception" in name else 128)


def torchvision_errors(name: str, cache: str, dynamo: bool = False) -> list[float]:
    size = torchvision_size(name)
    path = os.path.join(cache, f"zoo_{name}_{size}{'_dynamo' if dynamo else ''}.onnx")
    return torch_errors(torchvision_net(name), path, size, 1000, dynamo)


def export_once(net, path: str, size: int, dynamo: bool) -> str:
    """Export ``net`` to ``path`` (dynamic batch) unless the file is there already."""
    import torch

    if STATIC or OPSET:
        path = path[:-len(".onnx")] + ("_static" if STATIC else "") + (f"_b{STATIC_BATCH}" if STATIC_BATCH > 1 else "") \
            + (f"_opset{OPSET}" if OPSET else "") + ".onnx"
    if not os.path.exists(path) and dynamo:
        batch = {} if STATIC else {"dynamic_shapes": ({0: torch.export.Dim("N", min=1, max=64)},)}
        prog = torch.onnx.export(net, (torch.randn(STATIC_BATCH if STATIC else 2, 3, size, size),), dynamo=True,
                                 input_names=["image"], output_names=["logits"],
                                 **({"opset_version": OPSET} if OPSET else {}), **batch)
        prog.save(path)
    elif not os.path.exists(path):
        torch.onnx.export(net, (torch.randn(STATIC_BATCH, 3, size, size),), path, input_names=["image"],
                          output_names=["logits"], opset_version=OPSET or 17, dynamo=False,
                          **({} if STATIC else {"dynamic_axes": {"image": {0: "N"}, "logits": {0: "N"}}}))
    return path


def ort_optimized(path: str) -> onnx.ModelProto:
    """The file as ONNX Runtime's optimiser saves it (extended level: com.microsoft fused ops), loaded by onnxsal."""
    from onnxsal.model import load

    out = path[:-len(".onnx")] + "_ortopt.onnx"
    if not os.path.exists(out):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = out
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return load(out).proto     # a network the optimiser fuses nothing in (RepVGG's adds before each ReLU) stays plain


def simplified(path: str, tool: str) -> onnx.ModelProto:
    """The file as ``tool`` (onnxsim, onnxslim or onnxoptimizer, each with its defaults) rewrites it,
    loaded by onnxsal as the engine loads it."""
    from onnxsal.model import load

    out = path[:-len(".onnx")] + f"_{tool}.onnx"
    if not os.path.exists(out):
        m = onnx.load(path)
        if tool == "onnxsim":
            import onnxsim
            m, ok = onnxsim.simplify(m)
            assert ok, "onnxsim's own check failed"
        elif tool == "onnxslim":
            import onnxslim
            m = onnxslim.slim(m)
        else:
            import onnxoptimizer
            m = onnxoptimizer.optimize(m)
        onnx.save(m, out)
    return load(out).proto


def torch_errors(net, path: str, size: int, classes: int, dynamo: bool, float64: bool = False) -> list:
    """Export ``net`` to ``path`` once, then its VJP graph's input gradient against torch.autograd's
    for each seed (with ``--ort-optimized``, of the file as ONNX Runtime's optimiser saves it).
    With ``float64``, against torch.autograd on a float64 copy of ``net``, each cell also giving
    PyTorch's own float32 gradient against the same."""
    import copy

    import torch

    path = export_once(net, path, size, dynamo)
    sess = vjp_session(ort_optimized(path) if ORT_OPTIMIZED else simplified(path, SIMPLIFIER) if SIMPLIFIER
                       else onnx.load(path), "image", "logits")
    net64 = copy.deepcopy(net).double() if float64 else None
    errs = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        rows = 2                 # a static export too: onnxsal frees its batch
        x = rng.standard_normal((rows, 3, size, size)).astype(np.float32)
        cot = rng.standard_normal((rows, classes)).astype(np.float32)
        try:
            got = sess.run(["grad_image"], {"image": x, "grad_logits": cot})[0]
        except Exception:
            if not STATIC:
                raise
            # a static export whose batch onnxsal could not free runs one row at a time, as the
            # engine runs it
            got = np.concatenate([sess.run(["grad_image"], {"image": x[i:i + 1], "grad_logits": cot[i:i + 1]})[0]
                                  for i in range(rows)])
            ONE_ROW.add(os.path.basename(path))
        xt = torch.tensor(x, requires_grad=True)
        (net(xt) * torch.tensor(cot)).sum().backward()
        if not float64:
            errs.append(rel(got, xt.grad.numpy()))
            continue
        x64 = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        (net64(x64) * torch.tensor(cot, dtype=torch.float64)).sum().backward()
        errs.append(f"{rel(got, x64.grad.numpy()):.1e} / {rel(xt.grad.numpy(), x64.grad.numpy()):.1e}")
    return errs


def against_torch(m, net, size: int):
    """Per seed: the input batch, onnxsal's logits and input gradient (a random cotangent on the
    logits), and torch.autograd's gradient of ``net`` for the same cotangent."""
    import torch

    sess = vjp_session(m.proto, m.input.name, m.logits)
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        cot = rng.standard_normal((2, 1000)).astype(np.float32)
        logits, got = sess.run([m.logits, f"grad_{m.input.name}"], {m.input.name: x, f"grad_{m.logits}": cot})
        xt = torch.tensor(x, requires_grad=True)
        (net(xt) * torch.tensor(cot)).sum().backward()
        yield x, logits, got, xt.grad.numpy()


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def half_errors(name: str, cache: str) -> list[str]:
    """The float16 conversion of a torchvision export (see the module docstring), per seed:
    logits against ONNX Runtime on the float16 file / gradient against torch / Pearson."""
    from onnxconverter_common import float16

    from onnxsal.model import load

    size = torchvision_size(name)
    net = torchvision_net(name)
    path = export_once(net, os.path.join(cache, f"zoo_{name}_{size}.onnx"), size, dynamo=False)
    with warnings.catch_warnings():                   # it reports each weight it clamps to 1e-7 or 1e4
        warnings.simplefilter("ignore")
        half = float16.convert_float_to_float16(onnx.load(path))
    m = load(half)
    assert m.lifted_from == ("float16",), m.lifted_from
    try:        # the float16 file itself may not run (a Cast the converter left typed wrong, see the README)
        ref16 = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        ref16 = None
    cells = []
    for x, logits, got, ref in against_torch(m, net, size):
        own = ref16.run(None, {m.input.name: x.astype(np.float16)})[0].astype(np.float32) if ref16 else None
        same = "file fails" if own is None else "inf in file" if not np.isfinite(own).all() else f"{rel(logits, own):.1e}"
        cells.append(f"{same} / {rel(got, ref):.1e} / {pearson(got, ref):.4f}")
    return cells


def qdq_errors(name: str, cache: str, fmt: str = "QDQ") -> list[str]:
    """The int8 quantisation of a torchvision export (see the module docstring), per seed: onnxsal's
    logits against ONNX Runtime running the file unfused / ONNX Runtime's fused integer kernels
    against the same / Pearson of the straight-through input gradient with torch.autograd's on the
    float network."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from onnxsal.model import load

    size = torchvision_size(name)
    net = torchvision_net(name)
    path = export_once(net, os.path.join(cache, f"zoo_{name}_{size}.onnx"), size, dynamo=False)
    qpath = path[:-len(".onnx")] + f"_{fmt.lower()}.onnx"
    if not os.path.exists(qpath) and fmt == "Dynamic":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(path, qpath)
    if not os.path.exists(qpath):
        class Images(CalibrationDataReader):
            def __init__(self):
                rng = np.random.default_rng(100)
                self.it = iter([{"image": rng.standard_normal((1, 3, size, size)).astype(np.float32)} for _ in range(8)])

            def get_next(self):
                return next(self.it, None)

        quantize_static(path, qpath, Images(), quant_format=getattr(QuantFormat, fmt))
    m = load(qpath)
    assert m.quantisers and (fmt == "QDQ" or m.qoperator), qpath
    spec_opts = ort.SessionOptions()        # no fusion: each QuantizeLinear / DequantizeLinear as the spec says
    spec_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    spec = ort.InferenceSession(qpath, spec_opts, providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(qpath, providers=["CPUExecutionProvider"])     # its integer kernels, as deployed
    cells = []
    for x, logits, got, ref in against_torch(m, net, size):
        as_spec = spec.run(None, {m.input.name: x})[0]
        deployed = fused.run(None, {m.input.name: x})[0]
        cells.append(f"{rel(logits, as_spec):.1e} / {rel(deployed, as_spec):.1e} / {pearson(got, ref):.3f}")
    return cells


def _calibrate_batch_norm(mod, gen) -> bool:
    """Random running statistics and affine parameters for ``mod`` if it is a batch norm that keeps
    statistics (True), else nothing (False): eval-mode batch norms as trained ones look."""
    import torch

    if not (isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None):
        return False
    mod.running_mean.normal_(0, 0.1, generator=gen)
    mod.running_var.uniform_(0.5, 1.5, generator=gen)
    if mod.weight is not None:
        mod.weight.uniform_(0.5, 1.5, generator=gen)
        mod.bias.normal_(0, 0.1, generator=gen)
    return True


def timm_net(name: str, seed: int = 0):
    """A timm classifier (10 classes) with random weights, calibrated batch-norm statistics and
    no all-zero weight matrices; parameters frozen (timm caches some attention biases in eval)."""
    import timm
    import torch

    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, num_classes=10).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modules():
            _calibrate_batch_norm(mod, gen)
        for p in net.parameters():
            if p.dim() >= 2 and not p.abs().sum():
                p.normal_(0, 0.02)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def timm_errors(spec: str, cache: str, dynamo: bool = False) -> list[float]:
    name, size = spec.split(":") if ":" in spec else (spec, "224")
    size = int(size)
    path = os.path.join(cache, f"zoo_timm_{name}_{size}{'_dynamo' if dynamo else ''}.onnx")
    return torch_errors(timm_net(name), path, size, 10, dynamo)


def hf_net(name: str, seed: int = 0):
    """A Hugging Face transformers classifier from its default configuration (see ``--hf``), as a
    module from pixels to logits, and its input size."""
    import torch
    import transformers

    cls = getattr(transformers, f"{name}ForImageClassification")
    cfg = cls.config_class()
    cfg.num_labels = 10
    if name not in ("ConvNext", "ConvNextV2", "Cvt"):
        if isinstance(getattr(cfg, "num_hidden_layers", None), int):
            cfg.num_hidden_layers = min(cfg.num_hidden_layers, 2)
        for key in ("depths", "depth"):
            if isinstance(getattr(cfg, key, None), (list, tuple)):
                setattr(cfg, key, [1] * len(getattr(cfg, key)))
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if not _calibrate_batch_norm(mod, gen) and isinstance(mod, torch.nn.Conv2d):
                mod.weight.normal_(0, (2 / mod.weight[0].numel()) ** 0.5, generator=gen)
        for key, p in model.named_parameters():         # zero-initialised heads and layer scales
            if not p.abs().sum() and (p.dim() >= 2 or "weight" in key or "scale" in key or "lambda" in key):
                p.normal_(0, 0.02, generator=gen) if p.dim() >= 2 else p.uniform_(0.5, 1.5, generator=gen)
    for p in model.parameters():
        p.requires_grad_(False)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            out = self.inner(pixel_values=pixel_values)
            return out.logits if hasattr(out, "logits") else out[0]

    size = getattr(cfg, "image_size", 224)
    return Logits(model).eval(), int(size[0] if isinstance(size, (list, tuple)) else size)


def hf_errors(name: str, cache: str, dynamo: bool = False) -> list[str]:
    net, size = hf_net(name)
    path = os.path.join(cache, f"zoo_hf_{name}_{size}{'_dynamo' if dynamo else ''}.onnx")
    return torch_errors(net, path, size, 10, dynamo, float64=True)


def hf_detection_errors(name: str, cache: str) -> list[str]:
    """A Hugging Face set-prediction detector (``<Name>ForObjectDetection``) from a small random
    configuration (a 4-stage ResNet backbone of one block each where it takes one, 1 encoder and 1
    decoder layer (2 for Deformable DETR, whose box heads are tied across layers), 20 queries, 5 labels), exported with its logits and boxes beside its config.json,
    loaded as onnxsal reads such a folder (it must find the queries). A random cotangent on the logits
    at batch 2; each cell is onnxsal against torch.autograd in float64 / PyTorch's float32 against the
    same."""
    import copy
    import warnings

    import torch
    import transformers

    from onnxsal.detection import QueryOutput
    from onnxsal.model import load

    cls = getattr(transformers, f"{name}ForObjectDetection")
    kw = dict(num_labels=5, encoder_layers=1, decoder_layers=1 if name != "DeformableDetr" else 2)
    if name != "Yolos":
        kw.update(num_queries=20, use_timm_backbone=False, use_pretrained_backbone=False,
                  backbone_config=transformers.ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256],
                                                            embedding_size=32, out_features=["stage2", "stage3", "stage4"]))
        if name in ("Detr", "ConditionalDetr", "TableTransformer", "DabDetr"):
            kw["backbone_config"].out_features = ["stage4"]
    else:
        kw = dict(num_labels=5, num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                  image_size=[128, 128], num_detection_tokens=20)
    cfg = cls.config_class(**kw)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    class Heads(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            out = self.inner(pixel_values=pixel_values)
            return out.logits, out.pred_boxes

    net, size = Heads(model).eval(), 128
    folder = os.path.join(cache, f"zoo_hfdet_{name}_{size}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    cfg.save_pretrained(folder)
    if not os.path.exists(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.randn(2, 3, size, size),), path, input_names=["pixel_values"],
                              output_names=["logits", "pred_boxes"], opset_version=17, dynamo=False,
                              dynamic_axes={"pixel_values": {0: "N"}})
    m = load(path)
    assert isinstance(m.detection, QueryOutput), m.detection
    sess = vjp_session(m.proto, m.input.name, m.logits)
    net64 = copy.deepcopy(net).double()
    errs = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        cot = rng.standard_normal((2, m.detection.queries, m.detection.width)).astype(np.float32)
        got = sess.run([f"grad_{m.input.name}"], {m.input.name: x, f"grad_{m.logits}": cot})[0]
        grads = []
        for mod, dt in ((net, torch.float32), (net64, torch.float64)):
            xt = torch.tensor(x, dtype=dt, requires_grad=True)
            try:
                (mod(xt)[0] * torch.tensor(cot, dtype=dt)).sum().backward()
            except RuntimeError:          # a model that builds float32 tensors of its own runs in float32 only
                break
            grads.append(xt.grad.numpy())
        errs.append(f"{rel(got, grads[1]):.1e} / {rel(grads[0], grads[1]):.1e}" if len(grads) == 2 else
                    f"{rel(got, grads[0]):.1e} (float32)")
    return errs


def _ultralytics_export(yolo, path: str, size: int, **options) -> str:
    """``yolo.export(format="onnx")`` (onnxslim) into ``path``: Ultralytics writes beside its YAML, so
    the export runs in a scratch folder."""
    import shutil
    import tempfile

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            written = yolo.export(format="onnx", imgsz=size, simplify=True, verbose=False, **options)
        finally:
            os.chdir(here)
        shutil.copy(os.path.join(tmp, written), path)
    return path


def _first_tensor(out):
    """A network's first output, through the tuples Ultralytics' heads return outside export."""
    import torch

    return out if isinstance(out, torch.Tensor) else _first_tensor(out[0])


def ultralytics_errors(name: str, cache: str) -> list[float]:
    """An Ultralytics model built from its YAML (random weights; no download), exported by Ultralytics
    itself (torch.onnx, then onnxslim, a static batch of 1), against torch.autograd on the fused
    network it exported, at batch 2 with a random cotangent on the whole first output."""
    import torch
    from ultralytics import YOLO

    size = 128 if "-cls" in name else 160
    torch.manual_seed(0)
    yolo = YOLO(f"{name}.yaml")
    path = _ultralytics_export(yolo, os.path.join(cache, f"ultralytics_{name}_{size}.onnx"), size, dynamic=False)
    net = yolo.model.eval()
    from onnxsal.model import load

    m = load(path)
    sess = vjp_session(m.proto, m.input.name, m.output)
    errs = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        x = rng.uniform(0, 1, (2, 3, size, size)).astype(np.float32)
        xt = torch.tensor(x, requires_grad=True)
        out = _first_tensor(net(xt))
        cot = rng.standard_normal(tuple(out.shape)).astype(np.float32)
        (out * torch.tensor(cot)).sum().backward()
        got = sess.run([f"grad_{m.input.name}"], {m.input.name: x, f"grad_{m.output}": cot})[0]
        errs.append(rel(got, xt.grad.numpy()))
    return errs


def yolov5_errors(name: str, cache: str) -> list[str]:
    """A YOLOv5 model from its package's YAML (random weights; no download), exported as its export.py
    does (Detect in export mode, torch.onnx at opset 12, a dynamic batch, ``stride`` and ``names`` in
    the metadata) and read by onnxsal as 80 classes with objectness (else it fails), per seed at batch
    2: onnxsal's input gradient of the confidences it reads (objectness x class, added to the graph)
    against torch.autograd of the same product, with a random cotangent on all of them. Each cell is
    at YOLOv5's own initialisation / with the Detect convs' biases at 0 (see the README)."""
    import copy
    import logging

    import torch

    sys.path.insert(0, os.path.join(HERE, "..", ".venv-bench", "yolov5"))
    from yolov5.models.yolo import Detect, Model

    logging.getLogger("yolov5").setLevel(logging.WARNING)          # its layer tables
    size, folder = 160, os.path.dirname(__import__("yolov5").__file__)
    yaml = os.path.join(folder, "models", "segment" if name.endswith("-seg") else "", f"{name}.yaml")
    cells = []
    for zero_bias in (False, True):
        torch.manual_seed(0)
        net = Model(yaml, ch=3, nc=80).eval().fuse()
        for mod in net.modules():
            if isinstance(mod, Detect):
                mod.inplace, mod.dynamic, mod.export = True, False, True
                if zero_bias:
                    with torch.no_grad():
                        for conv in mod.m:
                            conv.bias.zero_()
        pristine = copy.deepcopy(net)      # a second run of one copy would backward through the first's graph
        path = os.path.join(cache, f"yolov5_{name}_{size}{'_zero_bias' if zero_bias else ''}.onnx")
        if not os.path.exists(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, torch.zeros(1, 3, size, size), path, opset_version=12, dynamo=False,
                                  input_names=["images"], output_names=["output0"],
                                  dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}})
            model = onnx.load(path)
            for k, v in {"stride": int(max(net.stride)), "names": {i: f"class{i}" for i in range(80)}}.items():
                model.metadata_props.add(key=k, value=str(v))
            onnx.save(model, path)
        _objectness_cells(path, pristine, size, 1.0, True, cells)
    return cells


def yolox_errors(spec: str, cache: str) -> list[str]:
    """A YOLOX model from its package's code (random weights as its Exp initialises them: BatchNorm
    eps 1e-3, class and objectness biases at a prior of 1e-2), exported as its tools/export_onnx.py does
    (SiLU written as x * sigmoid(x), opset 11, a dynamic batch); ``name:raw`` is that script's default
    (the head's rows as computed, the box undecoded), ``name:decoded`` its ``--decode_in_inference``
    (the box decoded in place: ScatterND). onnxsal must read 80 classes with objectness (else the check
    fails); per seed at batch 2, its input gradient of objectness x class against torch.autograd of
    the same product, with a random cotangent on all of them. Each cell is at YOLOX's own
    initialisation / with the head's prediction biases at 0."""
    import copy

    import torch

    sys.path.insert(0, os.path.join(HERE, "..", ".venv-bench", "yolox"))
    from yolox.models import YOLOPAFPN, YOLOX, YOLOXHead
    from yolox.models.network_blocks import SiLU
    from yolox.utils import replace_module

    arch, form = spec.split(":")
    depth, width, depthwise = {"yolox_nano": (0.33, 0.25, True), "yolox_tiny": (0.33, 0.375, False),
                               "yolox_s": (0.33, 0.5, False)}[arch]
    size, cells = 160, []
    for zero_bias in (False, True):
        torch.manual_seed(0)
        net = YOLOX(YOLOPAFPN(depth, width, depthwise=depthwise), YOLOXHead(80, width, depthwise=depthwise))
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eps, mod.momentum = 1e-3, 0.03
        net.head.initialize_biases(1e-2)
        if zero_bias:
            with torch.no_grad():
                for conv in list(net.head.cls_preds) + list(net.head.obj_preds) + list(net.head.reg_preds):
                    conv.bias.zero_()
        net = replace_module(net.eval(), torch.nn.SiLU, SiLU)
        net.head.decode_in_inference = form == "decoded"
        pristine = copy.deepcopy(net)
        path = os.path.join(cache, f"yolox_{arch}_{form}_{size}{'_zero_bias' if zero_bias else ''}.onnx")
        if not os.path.exists(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, torch.zeros(1, 3, size, size), path, opset_version=11, dynamo=False,
                                  input_names=["images"], output_names=["output"],
                                  dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
        _objectness_cells(path, pristine, size, 255.0, form == "decoded", cells)     # YOLOX takes 0-255 pixels
    return cells


def _objectness_cells(path: str, pristine, size: int, top: float, decoded: bool, cells: list) -> None:
    """The check of ``--yolov5`` and ``--yolox``: onnxsal must read ``path`` as 80 classes with
    objectness (its boxes decoded or not, as ``decoded`` says); then per seed at batch 2, pixels
    uniform in [0, ``top``], its input gradient of objectness x class against torch.autograd on a
    fresh copy of ``pristine`` (a second run of one copy would backward through the first's graph).
    A first call fills ``cells``, a second appends " / figure" to each."""
    import copy

    import torch

    from onnxsal.model import load

    m = load(path)
    det = m.detection
    if det is None or (det.classes, "objectness" in det.source, det.boxes is not None) != (80, True, decoded):
        raise RuntimeError(f"read as {det.describe() if det is not None else 'no detector'}")
    sess = vjp_session(m.proto, m.input.name, m.logits)
    second = bool(cells)
    for k, seed in enumerate(SEEDS):
        rng = np.random.default_rng(seed)
        x = rng.uniform(0, top, (2, 3, size, size)).astype(np.float32)
        xt = torch.tensor(x, requires_grad=True)
        out = _first_tensor(copy.deepcopy(pristine)(xt))
        conf = out[..., 4:5] * out[..., 5:85]
        cot = rng.standard_normal(tuple(conf.shape)).astype(np.float32)
        (conf * torch.tensor(cot)).sum().backward()
        got = sess.run([f"grad_{m.input.name}"], {m.input.name: x, f"grad_{m.logits}": cot})[0]
        err = f"{rel(got, xt.grad.numpy()):.1e}"
        if second:
            cells[k] = f"{cells[k]} / {err}"
        else:
            cells.append(err)


def _he_normal(net, skip) -> None:
    """He-normal weights on every conv but ``skip``: at Ultralytics' own initialisation the head's
    scores are equal to 6 digits across anchors, so TopK and NMS would pick among ties that two
    engines' roundings order differently."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.Conv2d) and mod is not skip:
                fan = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * (2.0 / fan) ** 0.5)


def ultralytics_final_errors(name: str, cache: str) -> list[float]:
    """An Ultralytics detector exported with its final detections (N, 300, 6): ``name:nms`` with
    ``nms=True`` (NonMaxSuppression in the graph), ``name:e2e`` with ``nms=False`` (an NMS-free head's
    TopK). He-normal convolutions. The cotangent is random on the score of every kept detection;
    the reference is torch.autograd on the network without its NMS, each kept detection matched to
    its anchor by box and score (``e2e``: the network with its own TopK, on every row both engines
    agree on to 1e-3; two detections with equal scores may come out in either order)."""
    import copy

    import torch
    from ultralytics import YOLO

    base, kind = name.split(":")
    size = 160
    torch.manual_seed(0)
    yolo = YOLO(f"{base}.yaml")
    head = yolo.model.model[-1]
    _he_normal(yolo.model, getattr(getattr(head, "dfl", None), "conv", None))
    with torch.no_grad():        # class biases at 0, not -10: confidences near 0.5, above NMS's 0.25 threshold
        for branch in (getattr(head, "cv3", None), getattr(head, "one2one_cv3", None)):
            for seq in branch or []:
                seq[-1].bias.zero_()
    plain = copy.deepcopy(yolo.model).eval()
    path = _ultralytics_export(yolo, os.path.join(cache, f"ultralytics_{base}_{kind}_{size}.onnx"), size,
                               nms=kind == "nms")
    from onnxsal.model import load

    m = load(path)
    assert type(m.detection).__name__ == "DetectionList", m.detection
    sess = vjp_session(m.proto, m.input.name, m.output)
    net = yolo.model.eval()
    if kind == "e2e":
        net.model[-1].end2end, net.model[-1].export = True, True
    errs = []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        x = rng.uniform(0, 1, (1, 3, size, size)).astype(np.float32)
        xt = torch.tensor(x, requires_grad=True)
        agree = None
        if kind == "e2e":
            out = _first_tensor(net(xt))
            rows = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {m.input.name: x})[0][0]
            # detections with equal scores may come out in either order in two engines: such rows are
            # left out of the cotangent, and the cell says how many rows it covers
            same = np.abs(rows - out.detach().numpy()[0]).max(axis=1) < 1e-3
            agree = f"{int(same.sum())}/{len(same)}"
            cot = rng.standard_normal(tuple(out.shape)).astype(np.float32) * same[None, :, None]
            (out * torch.tensor(cot)).sum().backward()
        else:
            rows = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {m.input.name: x})[0][0]
            kept = np.flatnonzero(rows[:, 4] > 0)
            cot = np.zeros((1,) + rows.shape, np.float32)
            cot[0, kept, 4] = rng.standard_normal(len(kept))
            out = _first_tensor(plain(xt))
            ref = out.detach().numpy()[0]
            xyxy = np.concatenate([ref[:2] - ref[2:4] / 2, ref[:2] + ref[2:4] / 2])
            score = 0
            for k in kept:
                c = int(round(rows[k, 5]))
                a = int(np.argmin(np.abs(xyxy - rows[k, :4, None]).sum(axis=0) + np.abs(ref[4 + c] - rows[k, 4])))
                score = score + float(cot[0, k, 4]) * out[0, 4 + c, a]
            score.backward()
        got = sess.run([f"grad_{m.input.name}"], {m.input.name: x, f"grad_{m.output}": cot})[0]
        errs.append(rel(got, xt.grad.numpy()) if agree is None else f"{rel(got, xt.grad.numpy()):.1e} ({agree} rows)")
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
    if KERAS_EXPORT:
        path = os.path.join(cache, f"zoo_keras_{name}_{size}_export.onnx")
        if not os.path.exists(path):
            model(np.zeros((1, size, size, 3), np.float32))     # Keras exports only a model that has run
            model.export(path, format="onnx", verbose=False)
    elif STATIC:
        # tf2onnx on its own at a fixed batch, as a user calls it, instead of converters/keras.py
        import tf2onnx

        path = os.path.join(cache, f"zoo_keras_{name}_{size}_static_b{STATIC_BATCH}.onnx")
        if not os.path.exists(path):
            spec = tf.TensorSpec((STATIC_BATCH, size, size, 3), tf.float32, name="image")
            tf2onnx.convert.from_function(tf.function(lambda x: model(x, training=False)), input_signature=[spec],
                                          opset=17, output_path=path)
    else:
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


def ppocr_errors(name: str, cache: str) -> list[float]:
    """onnxsal's input gradient of a PP-OCR model's output against torch.autograd on onnx2torch's
    conversion of the same file, run in float64 (``common.onnx2torch_float64``)."""
    import torch

    from common import PPOCR, onnx2torch_float64, ppocr_path
    from onnxsal.model import load

    m = load(ppocr_path(name), size=PPOCR[name][1])
    shape = (2, 3) + m.input.size
    net = onnx2torch_float64(attach(m.proto), m.input.name, shape)
    sess = vjp_session(m.proto, m.input.name, m.output)
    errs = []
    for seed in SEEDS:
        r = np.random.default_rng(seed)
        x = r.uniform(-1, 1, shape).astype(np.float32)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        y = net(xt)
        cot = r.standard_normal(tuple(y.shape)).astype(np.float32)
        (y * torch.tensor(cot, dtype=torch.float64)).sum().backward()
        got = sess.run([f"grad_{m.input.name}"], {m.input.name: x, f"grad_{m.output}": cot})[0]
        errs.append(rel(got, xt.grad.numpy()))
    return errs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keras", action="store_true", help="Keras applications through converters/keras.py")
    ap.add_argument("--dynamo", action="store_true", help="torchvision through torch.onnx's dynamo exporter")
    ap.add_argument("--timm", action="store_true", help="timm's architectures (name:size in --nets)")
    ap.add_argument("--ppocr", action="store_true", help="PP-OCR's models from the rapidocr-onnxruntime wheel")
    ap.add_argument("--half", action="store_true", help="torchvision, converted to float16 (onnxconverter-common)")
    ap.add_argument("--qdq", action="store_true", help="torchvision, quantised to int8 by ONNX Runtime (QDQ form)")
    ap.add_argument("--qoperator", action="store_true", help="the same in the QOperator form (QLinearConv...)")
    ap.add_argument("--dynamic", action="store_true", help="torchvision, dynamically quantised by ONNX Runtime "
                                                          "(DynamicQuantizeLinear, ConvInteger, MatMulInteger)")
    ap.add_argument("--ort-optimized", action="store_true",
                    help="torchvision or timm exports as ONNX Runtime's optimiser saves them (FusedConv, QuickGelu...)")
    ap.add_argument("--static", action="store_true",
                    help="export at batch 1 without a dynamic batch (as torch.onnx.export does by default)")
    ap.add_argument("--batch", type=int, default=1, help="with --static: the batch the file fixes (1 unless told)")
    ap.add_argument("--opset", type=int, default=None, help="the exporter's opset (23 with --dynamo: Attention ops; 9 to 12 "
                    "without: the opsets of older files, Upsample, attribute Slice/Pad/Clip)")
    ap.add_argument("--hf", action="store_true", help="Hugging Face transformers' image classifiers, random weights "
                    "from their default configurations, against torch.autograd in float64")
    ap.add_argument("--keras-export", action="store_true",
                    help="with --keras: the file Keras 3 writes with model.export(format='onnx')")
    ap.add_argument("--ultralytics", action="store_true",
                    help="Ultralytics YOLO models from their YAMLs, as Ultralytics exports them (onnxslim)")
    ap.add_argument("--yolov5", action="store_true",
                    help="YOLOv5 detectors and segmenters from their package's YAMLs, exported as its export.py does")
    ap.add_argument("--yolox", action="store_true",
                    help="YOLOX detectors from its package's code, exported as its tools/export_onnx.py does")
    ap.add_argument("--detection", action="store_true",
                    help="with --hf: Hugging Face's set-prediction detectors (DETR, YOLOS...)")
    ap.add_argument("--final", action="store_true",
                    help="with --ultralytics: detectors exported with their final detections (nms=True / NMS-free)")
    ap.add_argument("--simplifier", choices=("onnxsim", "onnxslim", "onnxoptimizer"), default=None,
                    help="torchvision, timm or Hugging Face exports as that tool rewrites them")
    ap.add_argument("--nets", default=None)
    args = ap.parse_args()
    global ORT_OPTIMIZED, STATIC, OPSET, STATIC_BATCH, KERAS_EXPORT
    ORT_OPTIMIZED, STATIC, OPSET, STATIC_BATCH = args.ort_optimized, args.static, args.opset, args.batch
    KERAS_EXPORT = args.keras_export
    global SIMPLIFIER
    SIMPLIFIER = args.simplifier
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TIMM_FUSED_ATTN", "0")       # F.scaled_dot_product_attention does not export at opset 17
    cache = os.path.join(HERE, ".cache")
    os.makedirs(cache, exist_ok=True)
    nets = (args.nets or (KERAS if args.keras else TIMM if args.timm else PPOCR_NETS if args.ppocr else
                          (HF_DETECTION if args.detection else HF) if args.hf else (ULTRALYTICS_FINAL if args.final else ULTRALYTICS) if args.ultralytics else
                          YOLOV5 if args.yolov5 else YOLOX_NETS if args.yolox else
                          TORCHVISION)).split(",")
    check = keras_errors if args.keras else (lambda n, c: timm_errors(n, c, args.dynamo)) if args.timm else \
        hf_detection_errors if args.hf and args.detection else \
        (lambda n, c: hf_errors(n, c, args.dynamo)) if args.hf else \
        (ultralytics_final_errors if args.final else ultralytics_errors) if args.ultralytics else \
        yolov5_errors if args.yolov5 else yolox_errors if args.yolox else \
        ppocr_errors if args.ppocr else half_errors if args.half else qdq_errors if args.qdq else \
        (lambda n, c: qdq_errors(n, c, "QOperator")) if args.qoperator else \
        (lambda n, c: qdq_errors(n, c, "Dynamic")) if args.dynamic else \
        (lambda n, c: torchvision_errors(n, c, args.dynamo))
    source = f"Keras{' model.export' if KERAS_EXPORT else ''} (tf.GradientTape)" if args.keras else \
        "timm (torch.autograd)" if args.timm else \
        "Ultralytics (torch.autograd on the fused network)" if args.ultralytics else \
        "YOLOv5 (torch.autograd of objectness x class on the fused network)" if args.yolov5 else \
        "YOLOX (torch.autograd of objectness x class)" if args.yolox else \
        "Hugging Face transformers (onnxsal vs torch.autograd in float64 / PyTorch's float32 vs the same)" \
        if args.hf else \
        "PP-OCR (torch.autograd on onnx2torch, float64)" if args.ppocr else \
        "torchvision as float16 (logits vs ONNX Runtime on the float16 file / gradient vs torch.autograd in float32 / "\
        "Pearson)" if args.half else \
        "torchvision quantised to QDQ int8 (logits vs ONNX Runtime on the file, unfused / ONNX Runtime fused vs "\
        "unfused / Pearson of the straight-through gradient with torch.autograd on the float network)" if args.qdq else \
        "torchvision quantised to int8 in QOperator form, run as QDQ (figures as for --qdq)" if args.qoperator else \
        "torchvision dynamically quantised to uint8/int8, run as QDQ with each input's grid held (figures as for "\
        "--qdq)" if args.dynamic else \
        "torchvision (torch.autograd)"
    print(f"# {source}"
          f"{', dynamo exporter' if args.dynamo else ''}"
          f"{f', opset {OPSET}' if OPSET else ''}{f', static batch of {STATIC_BATCH}' if STATIC else ''}"
          f"{', saved by ONNX Runtime at the extended optimisation level' if args.ort_optimized else ''}"
          f"{f', rewritten by {SIMPLIFIER}' if SIMPLIFIER else ''}: "
          f"max|onnxsal - reference| / max|reference|, seeds {SEEDS}")
    print("| network | " + " | ".join(f"seed {s}" for s in SEEDS) + " | s |")
    print("|---|" + "---|" * (len(SEEDS) + 1))
    for name in nets:
        t0 = time.perf_counter()
        try:
            errs = check(name, cache)
            cells = " | ".join(e if isinstance(e, str) else f"{e:.1e}" for e in errs)
        except Exception as exc:      # report and go on: the table is the point
            cells = f"failed: {type(exc).__name__}: {str(exc)[:160]}" + " |" * (len(SEEDS) - 1)
        shown = name + (" (one row per run)" if ONE_ROW else "")
        ONE_ROW.clear()
        print(f"| {shown} | {cells} | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
