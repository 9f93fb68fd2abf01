"""Method options, targets, input arrays and output paths a user can get wrong: a typed error with a
clear message, never a NaN map, a silently replaced value or a traceback."""

import os

import numpy as np
import onnx
import pytest

import onnxsal
from onnxsal.cli import main
from onnxsal.errors import ImageError, MethodError, OutputError, TargetError
from onnxsal.evaluate.faithfulness import evaluate
from onnxsal.export import export
from onnxsal.methods import check_options, get

import tiny


@pytest.fixture(scope="module")
def ex():
    return onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="raw")


X = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("method,options,message", [
    ("smoothgrad", {"noise_level": "nan"}, "noise_level takes a number, not 'nan'"),
    ("smoothgrad", {"noise_level": float("nan")}, "noise_level must be finite"),
    ("smoothgrad", {"noise_level": float("inf")}, "noise_level must be finite"),
    ("smoothgrad", {"n_samples": 2.5}, "n_samples takes a whole number, not 2.5"),
    ("smoothgrad", {"n_samples": True}, "n_samples takes a whole number, not True"),
    ("smoothgrad", {"seed": "seven"}, "seed takes a whole number"),
    ("ig", {"steps": "ten"}, "steps takes a whole number"),
    ("ig", {"baseline": float("nan")}, "baseline must be finite"),
    ("rise", {"p": float("nan")}, "p must be finite"),
    ("occlusion", {"window": 0}, "window must be between 1"),
    ("occlusion", {"stride": 0}, "stride >= 1"),
    ("occlusion", {"window": "abc"}, "window takes a whole number"),
    ("occlusion", {"baseline": float("nan")}, "baseline must be finite"),
    ("ablationcam", {"ratio_channels_to_ablate": [0.5]}, "takes a number"),
    ("smoothgrad", {"seed": -1}, "smoothgrad's option seed is a whole number >= 0, not -1"),
    ("ig", {"nt_samples": 2, "nt_seed": -3}, "ig's option nt_seed is a whole number >= 0, not -3"),
    ("ig", {"rule": np.array([1.0, 2.0])}, "ig's option rule takes a name, not ndarray"),
    ("inputxgradient", {"nt_type": ["smoothgrad"]}, "inputxgradient's option nt_type takes a name, not list"),
    ("rise", {"cells": 10 ** 9}, "rise's cells must be at most the input's larger side, 16, not 1000000000"),
])
def test_bad_option_values_are_refused(ex, method, options, message):
    with pytest.raises(MethodError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ex.explain(X, method, target=0, **options)


def test_whole_floats_count_and_none_seeds_draw_afresh(ex):
    """A count given as 3.0 (JSON's or NumPy's float) is the count 3; seed None draws new noise."""
    opts = check_options(get("smoothgrad"), {"n_samples": 3.0, "seed": None, "noise_level": np.float32(0.1)})
    assert opts["n_samples"] == 3 and isinstance(opts["n_samples"], int) and opts["seed"] is None
    assert opts["noise_level"] == pytest.approx(0.1)
    a = ex.explain(X, "smoothgrad", target=0, n_samples=3.0, seed=1).maps
    b = ex.explain(X, "smoothgrad", target=0, n_samples=np.int64(3), seed=1).maps
    np.testing.assert_array_equal(a, b)
    c = ex.explain(X, "smoothgrad", target=0, n_samples=3, seed=None).maps
    assert not np.array_equal(a, c)
    d = ex.explain(X, "smoothgrad", target=0, n_samples=np.array(3), seed=np.array(1)).maps   # 0-d arrays
    np.testing.assert_array_equal(a, d)
    opts = check_options(get("smoothgrad"), {"n_samples": np.array(3.0), "noise_level": np.array(0.1)})
    assert opts["n_samples"] == 3 and isinstance(opts["n_samples"], int) and opts["noise_level"] == pytest.approx(0.1)
    for bad, message in ((np.array([3]), "n_samples takes a whole number, not array"),
                         (np.array(2.5), r"n_samples takes a whole number, not np.float64\(2.5\)"),
                         (np.array(True), "n_samples takes a whole number, not")):
        with pytest.raises(MethodError, match=message):
            check_options(get("smoothgrad"), {"n_samples": bad})


def test_an_explicit_occlusion_window_is_kept(ex):
    """Only None means the automatic window; any number given is that window."""
    res = ex.explain(X, "occlusion", target=0, window=3, stride=1)
    assert res.summary()["options"]["window"] == 3


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "ig", "steps": 0}, "steps >= 1"),
    ({"method": "layerig", "steps": -2}, "steps >= 1"),
    ({"method": "smoothgrad", "n_samples": 0}, "n_samples >= 1"),
    ({"method": "smoothgrad", "noise_level": -0.1}, "noise_level >= 0"),
    ({"method": "smoothgrad", "noise_level": float("nan")}, "noise_level must be finite"),
    ({"method": "ig", "steps": 2.5}, "steps takes a whole number"),
])
def test_export_refuses_bad_settings(kwargs, message):
    with pytest.raises(MethodError, match=message):
        export(tiny.conv_net(size=16), **kwargs)


def test_saving_where_no_folder_can_be_made_is_an_output_error(ex, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = ex.explain(X, "gradcam", target=0)
    with pytest.raises(OutputError, match="cannot write the results to"):
        res.save(blocker / "sub")
    written = res.save(tmp_path / "new" / "deeper")          # missing parents are made
    assert written and all(os.path.isfile(p) for p in written)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused(ex, bad):
    """A NaN pixel gives NaN scores; the map normalised from them would look like a result."""
    x = X.copy()
    x[0, 1, 3, 4] = bad
    with pytest.raises(ImageError, match="1 NaN or infinite values"):
        ex.explain(x, "saliency", target=0)
    with pytest.raises(ImageError, match="NaN or infinite"):
        ex.explain_batch(np.concatenate([X, x]), "saliency", targets=0)


def test_non_finite_npy_files_are_one_line(tmp_path, capsys):
    onnx.save(tiny.conv_net(size=16), tmp_path / "m.onnx")
    x = X.copy()
    x[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    assert main(["explain", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), "-m", "saliency",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "NaN or infinite" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("target", [1.5, True, np.float32(0.25)])
def test_targets_that_are_not_indices_are_refused(ex, target):
    with pytest.raises(TargetError, match="is not a class index or label"):
        ex.explain(X, "saliency", target=target)


def test_whole_float_targets_are_indices(ex):
    assert ex.explain(X, "saliency", target=2.0).targets[0].index == 2
    assert ex.explain(X, "saliency", target=np.int64(1)).targets[0].index == 1


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"batch_size": -3}, "batch_size must be at least 1"),
    ({"batch_size": 2.5}, "batch_size takes a whole number"),
    ({"threads": 0}, "threads must be at least 1"),
    ({"memory_mb": 0}, "memory_mb must be at least 1"),
])
def test_run_settings_are_checked(kwargs, message):
    with pytest.raises(MethodError, match=message):
        onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="raw", **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"mean": [1.0, 2.0]}, r"mean must hold finite values, one per channel \(3\) or one for all"),
    ({"mean": [0.0, float("nan"), 0.0]}, "mean must hold finite values"),
    ({"std": [0.0, 0.0, 0.0]}, "std must hold finite, non-zero values"),
    ({"std": [1.0, float("inf"), 1.0]}, "std must hold finite, non-zero values"),
    ({"scale": 0.0}, "scale multiplies the pixels and must be finite and non-zero"),
    ({"scale": float("nan")}, "scale multiplies the pixels and must be finite and non-zero"),
])
def test_preprocessing_settings_are_checked(kwargs, message):
    with pytest.raises(ImageError, match=message):
        onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="imagenet", **kwargs)


def test_preprocessing_numbers_as_the_command_line_writes_them():
    """mean='0.5,0.4,0.3', a lone number, a NumPy row and scale='2' mean what --mean and --scale mean,
    in Explainer and in a Preprocess given whole."""
    img = (np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)

    def tensor(**kwargs):
        return onnxsal.Explainer(tiny.conv_net(size=16), "cpu", **kwargs).prepare(img).tensor

    ref = tensor(preprocess="raw", mean=[0.5, 0.4, 0.3], std=[2.0] * 3, scale=2.0, bgr=True)
    np.testing.assert_allclose(ref, ((img[..., ::-1] * 2.0 - [0.5, 0.4, 0.3]) / 2.0).transpose(2, 0, 1)[None],
                               rtol=1e-6)
    for kwargs in ({"mean": "0.5,0.4,0.3", "std": 2, "scale": "2", "bgr": np.bool_(True)},
                   {"mean": np.array([0.5, 0.4, 0.3]), "std": "2", "scale": np.float32(2), "bgr": True}):
        np.testing.assert_array_equal(tensor(preprocess="raw", **kwargs), ref)
    whole = onnxsal.Preprocess(preset="raw", mean="0.5 0.4 0.3", std=2.0, scale="2", color="BGR")
    np.testing.assert_array_equal(tensor(preprocess=whole), ref)


def test_one_mean_and_std_serve_every_channel():
    ex1 = onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="raw", mean=[0.5], std=[2.0])
    ex3 = onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="raw", mean=[0.5] * 3, std=[2.0] * 3)
    img = (np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)
    np.testing.assert_array_equal(ex1.prepare(img).tensor, ex3.prepare(img).tensor)


@pytest.mark.parametrize("smooth,message", [(-1.0, "smooth is a Gaussian sigma in pixels, >= 0"),
                                            (float("nan"), "smooth must be finite"), ("wide", "smooth takes a number")])
def test_smoothing_is_checked(ex, smooth, message):
    with pytest.raises(MethodError, match=message):
        ex.explain(X, "gradcam", target=0, smooth=smooth)


@pytest.mark.parametrize("kwargs,message", [({"cmap": "nosuch"}, "unknown colormap 'nosuch'"),
                                            ({"alpha": 2.0}, "alpha is the overlay's opacity"),
                                            ({"alpha": float("nan")}, "alpha is the overlay's opacity")])
def test_overlay_style_is_checked(ex, tmp_path, kwargs, message):
    res = ex.explain(X, "gradcam", target=0)
    with pytest.raises(OutputError, match=message):
        res.save(tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()
    assert res.save(tmp_path / "o", cmap="viridis_r", alpha=1)


def test_cli_checks_the_overlay_style_before_any_work(tmp_path, capsys):
    onnx.save(tiny.conv_net(size=16), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", X)
    for flags, message in ((["--cmap", "nosuch"], "unknown colormap"), (["--alpha", "1.5"], "opacity"),
                           (["--batch-size", "0"], "batch_size must be at least 1"),
                           (["--smooth", "-2"], "smooth is a Gaussian sigma")):
        code = main(["explain", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), "-m", "gradcam",
                     "--out", str(tmp_path / "o")] + flags)
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o").exists()


def test_sanity_checks_its_colormap_first(tmp_path, capsys):
    onnx.save(tiny.conv_net(size=16), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", X)
    assert main(["sanity", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), "-m", "gradcam", "--cmap", "nosuch",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown colormap 'nosuch'" in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"seed": -1}, "seed must be 0 or more"),
    ({"max_steps": 0}, "max_steps must be at least 1"),
    ({"threshold": float("nan")}, "threshold must be finite"),
    ({"threshold": 1.5}, "threshold is a Spearman rank correlation, between -1 and 1"),
])
def test_sanity_settings_are_checked(ex, kwargs, message):
    from onnxsal.evaluate.sanity import sanity_check

    with pytest.raises(MethodError, match=message):
        sanity_check(ex, [X], ["gradcam"], **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"step": 0}, "step must be at least 1 pixel"),
    ({"step": 1.5}, "step takes a whole number"),
    ({"blur_sigma": 0.0}, "blur_sigma must be above 0"),
    ({"blur_sigma": float("nan")}, "blur_sigma must be finite"),
    ({"tolerance": -1.0}, "tolerance is a distance in pixels"),
    ({"tolerance": float("inf")}, "tolerance must be finite"),
])
def test_evaluation_settings_are_checked(ex, kwargs, message):

    with pytest.raises(MethodError, match=message):
        evaluate(ex, [X], ["gradcam"], **kwargs)


def test_labels_must_name_every_class():
    """A labels file with one line too many (a background class) would shift every name by one."""
    from onnxsal.errors import ModelError

    with pytest.raises(ModelError, match="4 labels given, but the model scores 3 classes"):
        onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="raw", labels=["bg", "a", "b", "c"])
    ex3 = onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="raw", labels=["a", "b", "c"])
    assert ex3.explain(X, "saliency", target="c").targets[0].index == 2
    unit = tiny.conv_net(size=16, classes=1, softmax=False)       # one sigmoid-less unit: names for 0 and 1
    assert onnxsal.Explainer(unit, "cpu", preprocess="raw", labels=["no", "yes"]).model.label(1) == "yes"
    with pytest.raises(ModelError, match="3 labels given, but the model scores 1 classes"):
        onnxsal.Explainer(unit, "cpu", preprocess="raw", labels=["no", "yes", "maybe"])


def test_cli_labels_take_a_file_or_a_comma_list(tmp_path, capsys):
    onnx.save(tiny.conv_net(size=16), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", X)
    (tmp_path / "labels.txt").write_text("cat\ndog\nfox\n")
    for labels in ("cat,dog,fox", str(tmp_path / "labels.txt")):
        assert main(["explain", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), "-m", "saliency", "--target", "fox",
                     "--labels", labels, "--out", str(tmp_path / "o")]) == 0
        assert "fox (2)" in capsys.readouterr().out
    assert main(["explain", str(tmp_path / "m.onnx"), str(tmp_path / "x.npy"), "--labels", "cat,dog",
                 "--out", str(tmp_path / "o")]) == 2
    assert "2 labels given, but the model scores 3 classes" in capsys.readouterr().err


def test_gauss_legendre_node_count_is_capped(ex):
    """NumPy's leggauss solves an n x n eigenproblem: 10^6 nodes would ask for terabytes."""
    from onnxsal.methods.gradients import MAX_GAUSS_NODES, ig_path

    with pytest.raises(MethodError, match="Gauss-Legendre takes at most 4096 steps, not 1000000.*rule=trapezoid"):
        ex.explain(X, "ig", target=0, steps=1_000_000)
    with pytest.raises(MethodError, match="Gauss-Legendre takes at most 4096 steps, not 5000 \\(its nodes cost time "
                                          "cubic in the count\\)$"):
        export(tiny.conv_net(size=16), "ig", steps=5000)
    alphas, w = ig_path(MAX_GAUSS_NODES, "gausslegendre")
    assert len(alphas) == MAX_GAUSS_NODES and w.sum() == pytest.approx(1.0)


def test_running_out_of_memory_names_the_setting(ex, monkeypatch):
    """Counts whose rows would pass half the machine's memory are refused before NumPy allocates them:
    an allocation under the machine's size may succeed, and the system then kills the process as the
    rows are written. Where the system gives no size, NumPy's MemoryError still names the setting."""
    import onnxsal.context as context_module

    monkeypatch.setattr(context_module, "physical_memory", lambda: 2 ** 30)      # 1 GiB: half is 512 MiB
    row = X.size * 4                                                               # 3 KiB per copy of the input
    with pytest.raises(MethodError, match=r"smoothgrad would run out of memory with n_samples=100000: 100000 noisy "
                                          r"copies of the input and their gradients would take 0.6 GiB, more than "
                                          r"half of this machine's 1 GiB; ask for fewer$"):
        ex.explain(X, "smoothgrad", target=0, n_samples=100_000)
    assert ex.explain(X, "smoothgrad", target=0, n_samples=2000).map.shape == (16, 16)   # well under: runs
    for targets, arrays in ((0, 2), ([0, 1], 3)):      # the rows, and one gradient per target
        most = 2 ** 29 // (arrays * row)
        with pytest.raises(MethodError, match=f"ig would run out of memory with steps={most + 1}, rule=trapezoid: "
                                              f"{most + 1} path points and their gradients"):
            ex.explain(X, "ig", target=targets, steps=most + 1, rule="trapezoid")
    with pytest.raises(MethodError, match="rise would run out of memory with n_masks=100000: 100000 masked copies"):
        ex.explain(X, "rise", target=0, n_masks=100_000)
    with pytest.raises(MethodError, match="ig would run out of memory with nt_samples=100000: 100000 noisy copies"):
        ex.explain(X, "ig", target=0, nt_samples=100_000)
    with pytest.raises(MethodError, match="layerig would run out of memory with steps=.*path points in the layer"):
        ex.explain(X, "layerig", target=0, steps=10 ** 6, rule="trapezoid")
    monkeypatch.setattr(context_module, "physical_memory", lambda: 2 ** 50)       # no refusal: NumPy's own error
    with pytest.raises(MethodError, match="smoothgrad ran out of memory with n_samples=100000000"):
        ex.explain(X, "smoothgrad", target=0, n_samples=100_000_000)


def test_occlusion_windows_count_against_memory(monkeypatch):
    import onnxsal.context as context_module

    big = onnxsal.Explainer(tiny.conv_net(size=96), "cpu", preprocess="raw")
    x = np.random.default_rng(0).random((1, 3, 96, 96)).astype(np.float32)
    monkeypatch.setattr(context_module, "physical_memory", lambda: 2 ** 30)
    with pytest.raises(MethodError, match="occlusion would run out of memory with window=1, stride=1: 9216 occluded "
                                          "copies of the input would take 1.9 GiB"):
        big.explain(x, "occlusion", target=0, window=1, stride=1)
    assert big.explain(x, "occlusion", target=0, window=3, stride=3).map.shape == (96, 96)   # 1024 copies: 0.2 GiB


@pytest.mark.parametrize("kwargs,message", [
    ({"target": []}, "give at least one target"),
    ({"top_k": 1.5}, "top_k takes a whole number, not 1.5"),
    ({"top_k": True}, "top_k takes a whole number, not True"),
    ({"top_k": 0}, "top_k must be at least 1, not 0"),
])
def test_target_settings_are_target_errors(ex, kwargs, message):
    with pytest.raises(TargetError, match=message):
        ex.explain(X, "saliency", **kwargs)


def test_integer_arrays_of_targets_are_lists_of_classes(ex):
    assert [t.index for t in ex.explain(X, "saliency", target=np.array([2, 0])).targets] == [2, 0]
    assert len(ex.explain(X, "saliency", top_k=2.0).targets) == 2


# arguments of the wrong kind, through the API ----------------------------------------------------

@pytest.mark.parametrize("call,error,message", [
    (lambda ex: ex.explain(X, None), MethodError, "a method is named by a string"),
    (lambda ex: ex.explain(X, 5), MethodError, "a method is named by a string"),
    (lambda ex: ex.explain(X, "saliency", target={"a": 1}), TargetError, "is not a class index or label"),
    (lambda ex: ex.explain(X, "saliency", target=[None]), TargetError, "target None is not a class index"),
    (lambda ex: ex.explain(None, "saliency"), ImageError, "not NoneType"),
    (lambda ex: ex.explain([1, 2, 3], "saliency"), ImageError, "not list"),
    (lambda ex: ex.explain(np.zeros((0, 0, 3), np.uint8), "saliency"), ImageError, "array input is empty"),
    (lambda ex: ex.explain(np.zeros((1, 3, 0, 16), np.float32), "saliency"), ImageError, "array input is empty"),
    (lambda ex: ex.explain_batch([X, X], "saliency", targets=[0], target=[0, 1]), TargetError, "not both"),
    (lambda ex: ex.explain_batch([X, X], "saliency", target=[0]), TargetError, "1 targets for 2 images"),
    (lambda ex: ex.explain(X, "saliency", target=1, top_k=2), TargetError, "give a target or top_k=2, not both"),
    (lambda ex: ex.explain(X, "rise", progress=5), MethodError, r"progress is a function called with \(done, total\)"),
    # names given as arrays, which `in` cannot test against the choices
    (lambda ex: ex.explain(X, "saliency", score=np.array([1.0, 2.0])), TargetError, "score must be 'logit' or"),
    (lambda ex: ex.explain(X, "saliency", region=np.array(["won", "all"])), TargetError, "region must be one of won"),
    (lambda ex: evaluate(ex, [X], ["saliency"], deletion=np.array([1, 2])), MethodError, "substrate must be one of"),
    (lambda ex: export(ex, np.array([1.0, 2.0])), MethodError, "export supports gradcam"),
    (lambda ex: onnxsal.Preprocess.from_preset(np.array([1, 2])), ImageError, "unknown preprocessing preset array"),
])
def test_arguments_of_the_wrong_kind_are_typed_errors(ex, call, error, message):
    with pytest.raises(error, match=message):
        call(ex)


def test_captum_spelling_of_batch_targets(ex):
    """explain_batch(target=...) as Captum's attribute() spells it: the same maps as targets=."""
    a = ex.explain_batch(np.concatenate([X, X[:, :, ::-1]]), "saliency", target=[0, 2])
    b = ex.explain_batch(np.concatenate([X, X[:, :, ::-1]]), "saliency", targets=[0, 2])
    assert [r.target.index for r in a] == [0, 2]
    for r, s in zip(a, b):
        np.testing.assert_array_equal(r.map, s.map)


def test_array_likes_are_read_by_numpy(ex):
    """A tensor of another library (anything with __array__) is the array it holds."""
    class Held:
        def __array__(self, dtype=None, copy=None):
            return X if dtype is None else X.astype(dtype)

    np.testing.assert_array_equal(ex.explain(Held(), "saliency", target=1).map, ex.explain(X, "saliency", target=1).map)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"device": 3}, "DeviceError", "device is a name"),
    ({"device": "cuda:x"}, "DeviceError", "bad device 'cuda:x'"),
    ({"device": "cuda:-1"}, "DeviceError", "bad device"),
    ({"preprocess": 5}, "ImageError", "preprocess is a preset name or a Preprocess, not int"),
    ({"size": (0, 16)}, "SizeError", r"size is \(H, W\) in whole pixels"),
    ({"size": (16.5, 16)}, "SizeError", r"size is \(H, W\) in whole pixels"),
    ({"size": 16}, "SizeError", r"size is \(H, W\) in whole pixels"),
    ({"size": "16x"}, "SizeError", "must look like 224x224"),
    ({"labels": 4}, "ModelError", "labels are a list of class names"),
    ({"labels": "nofile"}, "MissingFileError", "labels file not found: nofile"),
    ({"mean": [0.2, "a", 0.1]}, "ImageError", r"mean takes numbers, not \[0.2, 'a', 0.1\]"),
    ({"std": [[0.5, 0.5, 0.5]]}, "ImageError", "std takes numbers, not"),
    ({"mean": "0.5,x"}, "ImageError", "mean takes numbers separated by commas, not '0.5,x'"),
    ({"scale": "1,2"}, "ImageError", "scale takes one number, not '1,2'"),
    ({"scale": [2.0]}, "ImageError", r"scale takes one number, not \[2.0\]"),
    ({"bgr": "no"}, "ImageError", "bgr is True or False, not 'no'"),
    ({"preprocess": onnxsal.Preprocess(mean=("a",))}, "ImageError", r"mean takes numbers, not \('a',\)"),
    ({"preprocess": onnxsal.Preprocess(scale="x")}, "ImageError", "scale takes one number, not 'x'"),
    ({"preprocess": onnxsal.Preprocess(color="CMYK")}, "ImageError", "color is RGB, BGR or L"),
    ({"preprocess": onnxsal.Preprocess(color="bgr")}, "ImageError", "color is RGB, BGR or L"),
    ({"preprocess": onnxsal.Preprocess(preset=5)}, "ImageError", "preset is a name"),
])
def test_explainer_settings_of_the_wrong_kind(kwargs, error, message):
    import onnxsal.errors as errors

    with pytest.raises(getattr(errors, error), match=message):
        onnxsal.Explainer(tiny.conv_net(size=16), **{"device": "cpu", "preprocess": "raw", **kwargs})


def test_models_by_path_bytes_or_proto_and_nothing_else(tmp_path):
    from onnxsal.errors import ModelError

    proto = tiny.conv_net(size=16)
    onnx.save(proto, tmp_path / "m.onnx")
    ref = onnxsal.Explainer(proto, "cpu", preprocess="raw").explain(X, "saliency", target=1).map
    for given in (str(tmp_path / "m.onnx"), tmp_path / "m.onnx", proto.SerializeToString()):
        got = onnxsal.Explainer(given, "cpu", preprocess="raw").explain(X, "saliency", target=1).map
        np.testing.assert_array_equal(got, ref)
    for given, message in ((5, "not int"), (None, "not NoneType"), (b"\x01junk", "bytes given are not a readable"),
                           (onnx.ModelProto(), "has no graph nodes")):
        with pytest.raises(ModelError, match=message):
            onnxsal.Explainer(given, "cpu", preprocess="raw")


def test_sizes_and_labels_as_the_command_line_writes_them(tmp_path):
    """size='16x16' and labels='a,b,c' (or a labels file) mean what --size and --labels mean;
    a string of labels is not a sequence of one-letter names."""
    ex = onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="raw", size="16x16", labels="cat,dog,fox")
    assert ex.model.input.size == (16, 16) and ex.model.labels == ["cat", "dog", "fox"]
    (tmp_path / "labels.txt").write_bytes("\ufeffcat\r\ndog\r\n\r\nfox\r\n".encode("utf-8"))   # Notepad's BOM and CRLF
    assert onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="raw",
                             labels=tmp_path / "labels.txt").model.labels == ["cat", "dog", "fox"]


def test_vjp_takes_a_path_and_one_name(tmp_path):
    proto = tiny.conv_net(size=16)
    onnx.save(proto, tmp_path / "m.onnx")
    out = proto.graph.output[0].name
    a = onnxsal.vjp(str(tmp_path / "m.onnx"), out, "image")
    b = onnxsal.vjp(proto, out, ["image"])
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output] and "grad_image" in \
        [o.name for o in a.graph.output]
    c = onnxsal.vjp(onnxsal.load(proto), out, "image")            # a loaded Model: its proto
    assert "grad_image" in [o.name for o in c.graph.output]
    with pytest.raises(onnxsal.errors.ModelError, match="not int"):
        onnxsal.vjp(5, out, "image")
    with pytest.raises(onnxsal.errors.LayerError, match="the wrt tensors are named by strings"):
        onnxsal.vjp(proto, out, 0)


@pytest.mark.parametrize("which", ["sanity", "evaluate"])
@pytest.mark.parametrize("args,kwargs,error,message", [
    (([X], []), {}, MethodError, "give at least one method"),
    (([], ["gradcam"]), {}, MethodError, "give at least one image"),
    (([X], 5), {}, MethodError, "methods are a name or a list of names, not int"),
    ((5, ["gradcam"]), {}, ImageError, "images are a list of inputs"),
    (([X], ["gradcam"]), {"options": 5}, MethodError, "options map each method's name to a dict"),
    (([X], ["gradcam"]), {"options": {"gradcam": 5}}, MethodError, "options map each method's name to a dict"),
    (([X], ["gradcam"]), {"options": {"occlusion": {"window": 4}}}, MethodError,
     "options given for occlusion, which is not among the methods run"),
    (([X], ["gradcam"]), {"progress": 5}, MethodError, r"progress is a function called with \(done, total, what\)"),
])
def test_sanity_and_evaluate_arguments(ex, which, args, kwargs, error, message):
    from onnxsal.evaluate.sanity import sanity_check

    run = sanity_check if which == "sanity" else evaluate
    with pytest.raises(error, match=message):
        run(ex, *args, **kwargs)
    with pytest.raises(onnxsal.errors.ModelError, match=r"ex is an onnxsal.Explainer \(Explainer\('model.onnx'\)\), "
                       "not str"):
        run("model.onnx", [X], ["gradcam"])


@pytest.mark.parametrize("kwargs,message", [
    ({"permuted": "permuted.onnx"}, "permuted is an onnxsal.Explainer"),
    ({"modes": ["sideways"]}, "unknown randomisation mode 'sideways'"),
    ({"modes": 5}, "modes are a name or a list of names, not 5"),
])
def test_sanity_settings_of_the_wrong_kind(ex, kwargs, message):
    from onnxsal.evaluate.sanity import sanity_check

    with pytest.raises(onnxsal.errors.OnnxsalError, match=message):
        sanity_check(ex, [X], ["saliency"], max_steps=1, **kwargs)


def test_one_randomisation_mode_is_one_mode_not_one_per_letter(ex):
    from onnxsal.evaluate.sanity import sanity_check

    rep = sanity_check(ex, [X], "saliency", modes="independent", max_steps=2)
    assert {s.mode for s in rep.steps} == {"independent"} and len(rep.steps) == 2


@pytest.mark.parametrize("masks,message", [
    ([5], "the mask of array must be a 2-D array of the image's size, not int"),
    (["nosuch.png"], "mask not found: nosuch.png"),
    ([np.ones((16, 16, 3), bool)], r"not an array of shape \(16, 16, 3\) and dtype bool"),
    ([np.full((16, 16), "a")], "and dtype <U1"),
    ([np.ones((8, 8), bool)], "the mask of array is 8x8 pixels but the image is 16x16"),
    ([np.zeros((16, 16), bool)], "the mask of array is empty"),
    (np.ones((1, 16, 16), bool), "masks are a list with one mask"),
])
def test_masks_are_checked_before_any_work(ex, monkeypatch, masks, message):
    """A mask the pointing game cannot read is refused before the first map, not after the curves."""

    def never(*args, **kwargs):
        raise AssertionError("explained before the masks were checked")

    monkeypatch.setattr(type(ex), "explain", never)
    with pytest.raises(onnxsal.errors.OnnxsalError, match=message):
        evaluate(ex, [X], ["saliency"], masks=masks, step=64)


def test_masks_may_be_given_as_files(ex, tmp_path):
    from PIL import Image


    mask = np.zeros((16, 16), bool)
    mask[4:9, 6:12] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    by_file = evaluate(ex, [X], ["saliency"], masks=[tmp_path / "m.png"], step=64)
    by_array = evaluate(ex, [X], ["saliency"], masks=[mask], step=64)
    assert by_file.results[0].energy == by_array.results[0].energy and by_file.results[0].hit is not None


def test_one_method_one_image_and_method_spellings(ex, tmp_path):
    """A single name or input stands alone (not one per letter); options may name a method as its
    users spell it; evaluate's masks come one per image."""
    from onnxsal.evaluate.sanity import sanity_check

    one = evaluate(ex, X, "occlusion", step=64, options={"Occlusion": {"window": 4}})
    listed = evaluate(ex, [X], ["occlusion"], step=64, options={"occlusion": {"window": 4}})
    assert one.methods == ["occlusion"] and len(one.images) == 1
    np.testing.assert_array_equal(one.results[0].curves.deletion, listed.results[0].curves.deletion)
    other = evaluate(ex, X, "occlusion", step=64, options={"occlusion": {"window": 8}})
    assert not np.array_equal(other.results[0].curves.deletion, one.results[0].curves.deletion)   # options used
    rep = sanity_check(ex, X, "saliency", max_steps=1)
    assert len(rep.images) == 1 and rep.methods == ["saliency"]
    np.save(tmp_path / "x.npy", X)
    by_path = evaluate(ex, str(tmp_path / "x.npy"), "occlusion", step=64, options={"occlusion": {"window": 4}})
    assert by_path.images == ["x"]
    np.testing.assert_array_equal(by_path.results[0].curves.deletion, one.results[0].curves.deletion)
    with pytest.raises(ImageError, match="1 masks for 2 images"):
        evaluate(ex, np.concatenate([X, X]), ["saliency"], masks=[np.ones((16, 16), bool)], step=64)


def test_export_writes_one_layer(ex):
    from onnxsal.errors import LayerError

    with pytest.raises(LayerError, match="export writes a CAM of one layer, not of 2"):
        export(ex.model, "gradcam", ["relu1", "relu2"])
    one = export(ex.model, "gradcam", ["relu1"])
    assert onnx.helper.printable_graph(one.graph) == onnx.helper.printable_graph(export(ex.model, "gradcam", "relu1").graph)


def test_export_takes_an_explainer_and_names_its_methods(ex, tmp_path):
    import onnxruntime as ort

    proto = tiny.conv_net(size=16)
    a, b = export(proto, "saliency"), export(onnxsal.Explainer(proto, "cpu", preprocess="raw"), "saliency")
    feed = {"image": X, "target": np.array([1], np.int64)}
    outs = [ort.InferenceSession(g.SerializeToString()).run(None, feed) for g in (a, b)]
    for u, v in zip(*outs):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(MethodError, match="export supports gradcam"):
        export(proto, None)


def test_surgery_takes_paths_and_single_names(tmp_path):
    proto = tiny.conv_net(size=16)
    onnx.save(proto, tmp_path / "m.onnx")
    out = proto.graph.output[0].name
    layer = onnxsal.load(proto).layers[-1].tensor
    a, b = onnxsal.expose(str(tmp_path / "m.onnx"), layer), onnxsal.expose(proto, [layer])
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output] == [layer]
    assert [o.name for o in onnxsal.replace(proto, layer, out).graph.output] == [out]
    head, tail = onnxsal.split(tmp_path / "m.onnx", layer, out)
    assert [o.name for o in tail.graph.output] == [out] and [i.name for i in tail.graph.input] == [layer]
    from onnxsal.errors import ModelError

    with pytest.raises(ModelError, match="not int"):
        onnxsal.expose(5, [layer])
    from onnxsal.errors import LayerError

    for call in (lambda: onnxsal.expose(proto, 3), lambda: onnxsal.expose(proto, [layer, 3]),
                 lambda: onnxsal.split(proto, layer, {out: 1}), lambda: onnxsal.replace(proto, layer, None)):
        with pytest.raises(LayerError, match="tensors are named by strings"):
            call()
    for call in (lambda: onnxsal.split(proto, [layer], out), lambda: onnxsal.replace(proto, 2, out),
                 lambda: onnxsal.split(proto, None, out)):
        with pytest.raises(LayerError, match="the tensor to cut at"):
            call()


def test_load_takes_a_preset_name_as_explainer_does():
    proto = tiny.conv_net(size=16)
    assert onnxsal.load(proto, preprocess="imagenet").preprocess.preset == "imagenet"
    np.testing.assert_array_equal(onnxsal.load(proto, preprocess="unit").preprocess.mean, (0.0, 0.0, 0.0))
    with pytest.raises(ImageError, match="preprocess is a preset name or a Preprocess, not int"):
        onnxsal.load(proto, preprocess=5)
    with pytest.raises(ImageError, match="unknown preprocessing preset 'nope'"):
        onnxsal.load(proto, preprocess="nope")


def test_results_and_layers_of_the_wrong_kind(ex, tmp_path):
    from onnxsal.errors import LayerError, ModelError

    res = ex.explain(X, "gradcam", target=0)
    with pytest.raises(OutputError, match="save takes a folder's path, not int"):
        res.save(5)
    for k, message in (("x", "k takes a whole number"), (0, "top takes k from 1, not 0"), (-1, "from 1, not -1")):
        with pytest.raises(TargetError, match=message):
            res.top(k)
    assert [t["index"] for t in res.top(2)] == [t["index"] for t in res.top(5)[:2]]
    layer = ex.model.layers[0]                 # a Layer passed back as the layer: its tensor
    np.testing.assert_array_equal(ex.explain(X, "gradcam", target=0, layer=layer).map,
                                  ex.explain(X, "gradcam", target=0, layer=layer.tensor).map)
    with pytest.raises(LayerError, match="a layer is named by its tensor"):
        ex.explain(X, "gradcam", target=0, layer=3)
    with pytest.raises(ModelError, match="fixed inputs map each input's name to its value, not int"):
        onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="raw", fixed_inputs=5)


def _pooled(last: str, opset: int = 13) -> onnx.ModelProto:
    """Image -> per-channel mean -> `last` (Log, or an ArgMax the scores are read back from)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0)]
    if last == "Log":
        nodes.append(helper.make_node("Log", ["m"], ["y"]))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    else:
        nodes.append(helper.make_node("ArgMax", ["m"], ["y"], axis=1))
        out = helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 1])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_a_nan_score_is_refused_not_explained():
    """log of a negative channel mean: NaN scores. Saliency's gradient (1/m) would still be finite
    and give a map of a score that does not exist."""
    from onnxsal.errors import ModelError

    ex = onnxsal.Explainer(_pooled("Log"), "cpu", preprocess="raw")
    x = np.ones((1, 3, 8, 8), np.float32)
    x[:, 1] = -1.0
    for method, target in (("saliency", None), ("saliency", 0), ("occlusion", None)):
        with pytest.raises(ModelError, match=r"output for this input holds NaN \(1 of 3 values\)"):
            ex.explain(x, method, target)
    assert np.isfinite(ex.explain(np.ones((1, 3, 8, 8), np.float32), "saliency", 0).raw).all()


def test_flat_maps_say_so():
    """A map of one value normalises to a blank image; the notes say why, and which value it held."""
    ex = onnxsal.Explainer(_pooled("ArgMax"), "cpu", preprocess="raw")
    x = np.random.default_rng(0).random((1, 3, 8, 8)).astype(np.float32)
    res = ex.explain(x, "inputxgradient", target=0)
    assert not any("one value everywhere" in n for n in res.notes)      # x * 1/64 varies with x
    res = ex.explain(x, "saliency", target=0)                         # |d mean / dx| = 1/64 everywhere
    assert not res.map.any()
    assert f"the map for '0' holds one value everywhere ({1 / 64:.3g}): every pixel counts alike, and the " \
           "normalised map shows 0" in res.notes
    tiny_ex = onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="raw")
    res = tiny_ex.explain(np.zeros_like(X), "inputxgradient", target=1)   # x = 0: every product is 0
    assert "the map for 'class1' is 0 everywhere: a blank map, not a faint one" in res.notes
    assert not any("everywhere" in n for n in tiny_ex.explain(X, "saliency", target=1).notes)


def test_a_size_past_the_machine_is_refused_before_the_run(monkeypatch):
    """--size 100000x100000 on a dynamic model ended with the system killing the process."""
    import onnxsal.model as model_module
    from onnxsal.errors import SizeError

    proto = tiny.conv_net(size=16)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2 ** 18}          # 1 GiB
    monkeypatch.setattr(model_module.os, "sysconf", lambda name: pages[name])
    with pytest.raises(SizeError, match=r"a 8000x8000 input holds 0.7 GiB as float32, more than a quarter of this "
                                        r"machine's 1 GiB"):
        onnxsal.load(proto, size=(8000, 8000))
    assert onnxsal.load(proto, size=(4000, 4000)).input.size == (4000, 4000)     # 0.18 GiB: taken


def test_a_layer_a_method_does_not_use_is_noted(ex):
    """One --layer serves every CAM of a run; a gradient method beside them says it ignored it."""
    layer = ex.model.layers[0].tensor
    res = ex.explain(X, "saliency", target=0, layer=layer)
    assert f"saliency explains the input itself; it does not use the layer {layer!r}" in res.notes
    np.testing.assert_array_equal(res.map, ex.explain(X, "saliency", target=0).map)
    assert not any("does not use the layer" in n for n in ex.explain(X, "gradcam", target=0, layer=layer).notes)


def test_a_probability_score_without_a_final_activation_is_noted():
    ex = onnxsal.Explainer(tiny.conv_net(size=16, softmax=False), "cpu", preprocess="raw")
    res = ex.explain(X, "saliency", target=0, score="probability")
    assert "the model's output ends in no softmax or sigmoid, so the probability scored is the output as it is" \
        in res.notes
    np.testing.assert_array_equal(res.map, ex.explain(X, "saliency", target=0).map)
    assert not any("ends in no softmax" in n for n in ex.explain(X, "saliency", target=0).notes)
