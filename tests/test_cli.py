"""The command line end to end: files written, one readable error line, non-zero exits."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from onnxsal.cli import main

import tiny


@pytest.fixture()
def files(tmp_path):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny.conv_net(size=16), model)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "cat.png")
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / "dog.jpg")
    return tmp_path, str(model)


def test_explain_writes_png_npy_json(files, capsys):
    tmp, model = files
    out = tmp / "results"
    code = main(["explain", model, str(tmp / "cat.png"), str(tmp / "dog.jpg"), "-m", "scorecam", "-m", "occlusion",
                 "--top-k", "2", "--out", str(out), "-O", "window=4"])
    assert code == 0
    names = sorted(os.listdir(out))
    assert names == ["cat.json", "cat.occlusion.npy", "cat.occlusion.png", "cat.scorecam.npy", "cat.scorecam.png",
                     "dog.json", "dog.occlusion.npy", "dog.occlusion.png", "dog.scorecam.npy", "dog.scorecam.png"]
    maps = np.load(out / "cat.scorecam.npy")
    assert maps.shape == (2, 40, 48) and maps.dtype == np.float32 and 0 <= maps.min() and maps.max() <= 1
    summary = json.loads((out / "cat.json").read_text())
    assert summary["input_size"] == [16, 16] and len(summary["top"]) == 3
    assert summary["methods"]["occlusion"]["options"]["window"] == 4
    assert summary["methods"]["scorecam"]["layer"] == "relu2"
    assert len(summary["methods"]["scorecam"]["targets"]) == 2
    assert Image.open(out / "cat.scorecam.png").size[0] > 48


def test_explain_averages_a_cam_over_repeated_layers(files, capsys):
    tmp, model = files
    out = tmp / "results"
    assert main(["explain", model, str(tmp / "cat.png"), "-m", "gradcam", "--layer", "relu1", "-l", "relu2",
                 "--out", str(out)]) == 0
    assert "gradcam at relu1, relu2 ->" in capsys.readouterr().out
    summary = json.loads((out / "cat.json").read_text())
    assert summary["methods"]["gradcam"]["layer"] == ["relu1", "relu2"]
    assert main(["explain", model, str(tmp / "cat.png"), "-m", "guidedgradcam", "-l", "relu1", "-l", "relu2",
                 "--out", str(out)]) == 2
    assert "guidedgradcam reads one layer" in capsys.readouterr().err
    for command in ("sanity", "evaluate"):
        assert main([command, model, str(tmp / "cat.png"), "-m", "gradcam", "-l", "relu1", "-l", "relu2", "--out",
                     str(tmp / command), "-q"]) == 0
        assert main([command, model, str(tmp / "cat.png"), "-m", "guidedgradcam", "-l", "relu1", "-l", "relu2",
                     "--out", str(tmp / command), "-q"]) == 2
        assert "guidedgradcam reads one layer" in capsys.readouterr().err


def test_explain_reads_an_image_piped_to_standard_input(files):
    """`curl ... | onnxsal explain model.onnx -`: '-' is an encoded image on stdin, named "stdin"."""
    tmp, model = files
    out = tmp / "piped"
    cli = [sys.executable, "-m", "onnxsal.cli", "explain", model]
    data = (tmp / "cat.png").read_bytes()
    run = subprocess.run(cli + [str(tmp / "dog.jpg"), "-", "-m", "gradcam", "--out", str(out), "-q"], input=data,
                         capture_output=True)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(out)) == ["dog.gradcam.npy", "dog.gradcam.png", "dog.json", "stdin.gradcam.npy",
                                       "stdin.gradcam.png", "stdin.json"]
    assert main(["explain", model, str(tmp / "cat.png"), "-m", "gradcam", "--out", str(tmp / "file"), "-q"]) == 0
    np.testing.assert_array_equal(np.load(out / "stdin.gradcam.npy"), np.load(tmp / "file" / "cat.gradcam.npy"))
    for args, given, message in ((["-", "-"], data, "standard input ('-') holds one image; give it once"),
                                 (["-"], b"junk", "cannot read the image bytes as an image (UnidentifiedImageError: "
                                                  "cannot identify image file)")):
        run = subprocess.run(cli + args + ["--out", str(out)], input=given, capture_output=True)
        err = run.stderr.decode().strip()
        assert run.returncode == 2 and err == f"error: {message}", err


def test_inspect_shows_layers(files, capsys):
    _, model = files
    assert main(["inspect", model]) == 0
    text = capsys.readouterr().out
    assert "NCHW" in text and "relu2" in text and "default layer" in text and "logits" in text


def test_inspect_and_explain_say_when_onnx_runtime_refuses_the_model(tmp_path, capsys):
    """A model ONNX Runtime will not load: `inspect` says so in place of the gradient line (which
    would otherwise offer the gradient-free methods), and `explain` exits with that one line."""
    path = str(tmp_path / "refused.onnx")
    onnx.save(tiny.refused_pool_net(), path)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "img.png")
    reason = "ONNX Runtime could not load the model: Exception during initialization: Pad should be smaller than kernel."
    assert main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert f"runtime   no method can run it: {reason}" in text and "gradients" not in text
    assert main(["explain", path, str(tmp_path / "img.png"), "-m", "occlusion", "--preprocess", "unit",
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert reason in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["explain", "{tmp}/none.onnx", "{tmp}/cat.png"], "model file not found"),
    (["explain", "{model}", "{tmp}/none.png"], "image not found"),
    (["explain", "{model}", "{tmp}/junk.png"], "cannot read"),
    (["explain", "{tmp}/junk.png", "{tmp}/cat.png"], "not a readable ONNX"),
    (["explain", "{model}", "{tmp}/cat.png", "-m", "nosuch"], "unknown method"),
    (["explain", "{model}", "{tmp}/cat.png", "-m", "scorecam", "--layer", "nope"], "unknown layer"),
    (["explain", "{model}", "{tmp}/cat.png", "-m", "occlusion", "--target", "7"], "out of range"),
    (["explain", "{model}", "{tmp}/cat.png", "-m", "occlusion", "--target", "zebra"], "unknown target label"),
    (["explain", "{model}", "{tmp}/cat.png", "--device", "tpu"], "unknown device"),
    (["explain", "{model}", "{tmp}/cat.png", "-m", "occlusion", "-O", "window=0"], "window must be between 1"),
    (["explain", "{model}", "{tmp}/cat.png", "-m", "occlusion", "-O", "window=2.5"], "takes a whole number"),
    (["explain", "{model}", "{tmp}/cat.png", "-m", "smoothgrad", "-O", "noise_level=nan"], "takes a number"),
    (["explain", "{model}", "{tmp}/cat.png", "-m", "smoothgrad", "-O", "noise_level=NaN"], "must be finite"),
    (["explain", "{model}", "{tmp}/cat.png", "--target-weights", "{tmp}/zeros.npy"], "target weights are all zero"),
    (["explain", "{model}", "{tmp}/cat.png", "--target-weights", "{tmp}/cat.png"], "not a .npy file"),
    (["explain", "{model}", "{tmp}/cat.png", "-t", "1", "-k", "2"], "give --target (or --target-weights) or --top-k 2"),
    (["explain", "{model}", "{tmp}/cat.png", "--target-weights", "{tmp}/zeros.npy", "-k", "2"], "not both"),
    (["explain", "{model}", "{tmp}/cat.png", "--mean", "0.5,x"], "--mean takes numbers separated by commas, not '0.5,x'"),
    (["sanity", "{model}", "{tmp}/cat.png", "--std", "1;2;3"], "--std takes numbers separated by commas, not '1;2;3'"),
    (["sanity", "{model}", "{tmp}/junk.png"], "cannot read"),
    (["evaluate", "{model}", "{tmp}/junk.png"], "cannot read"),
])
def test_errors_are_one_line(files, capsys, args, message):
    """Exactly one line on stderr: no blank line left by a progress bar where stderr is no terminal."""
    tmp, model = files
    (tmp / "junk.png").write_text("not an image")
    np.save(tmp / "zeros.npy", np.zeros(3, np.float32))
    out = tmp / "o"
    code = main([a.format(tmp=tmp, model=model) for a in args] + ["--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err and err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() or os.listdir(out) == []


def test_nothing_half_written_when_a_later_image_fails(files, capsys):
    tmp, model = files
    out = tmp / "o"
    assert main(["explain", model, str(tmp / "cat.png"), str(tmp / "missing.png"), "-m", "occlusion", "--out", str(out)]) != 0
    assert not out.exists() or os.listdir(out) == []


def test_console_script_runs_in_a_subprocess(files):
    tmp, model = files
    exe = os.path.join(os.path.dirname(sys.executable), "onnxsal")
    r = subprocess.run([exe, "explain", model, str(tmp / "cat.png"), "-m", "rise", "-O", "n_masks=50", "--out", str(tmp / "s")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp / "s" / "cat.rise.png").exists()
    r = subprocess.run([exe, "inspect", str(tmp / "cat.png")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_later_runs_add_their_methods_to_the_summary(files):
    """Each run writes through a scratch folder; the summary in --out still gathers every run's methods."""
    tmp, model = files
    out = tmp / "results"
    assert main(["explain", model, str(tmp / "cat.png"), "-m", "gradcam", "--out", str(out), "-q"]) == 0
    assert main(["explain", model, str(tmp / "cat.png"), "-m", "saliency", "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "cat.json").read_text())
    assert sorted(summary["methods"]) == ["gradcam", "saliency"]
    assert not [p for p in os.listdir(out) if p.startswith(".onnxsal-")]


def test_bracketed_names_reach_the_terminal_verbatim(tmp_path, capsys):
    """paddle2onnx names dimensions and tensors like ``p2o.DynamicDimension.0``; printed inside
    brackets they looked like console markup tags and vanished from the message."""
    model = tiny.conv_net(metadata=False)
    for ax in (0, 2, 3):
        d = model.graph.input[0].type.tensor_type.shape.dim[ax]
        d.Clear()
        d.dim_param = f"p2o.DynamicDimension.{ax}"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["inspect", str(path)]) != 0
    err = capsys.readouterr().err
    assert "[p2o.DynamicDimension.0,3,p2o.DynamicDimension.2,p2o.DynamicDimension.3]" in err


def test_explain_takes_folders_and_keeps_same_named_images_apart(files):
    tmp, model = files
    for folder in ("cats", "dogs"):
        (tmp / folder).mkdir()
        Image.open(tmp / "cat.png").save(tmp / folder / "001.png")
    (tmp / "dogs" / "notes.txt").write_text("not an image")
    out = tmp / "results"
    assert main(["explain", model, str(tmp / "cats"), str(tmp / "dogs"), str(tmp / "dog.jpg"), "-m", "gradcam",
                 "--out", str(out), "-q"]) == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["cats_001.gradcam.png", "dog.gradcam.png",
                                                                        "dogs_001.gradcam.png"]
    (tmp / "empty").mkdir()
    assert main(["explain", model, str(tmp / "empty"), "-m", "gradcam", "--out", str(out)]) != 0


def test_output_paths_that_cannot_be_made_are_one_line(files, capsys):
    """A folder below a file cannot be made: explain's --out and export's -o say so in one line."""
    tmp, model = files
    (tmp / "plain").write_text("a file, not a folder")
    for args in (["explain", model, str(tmp / "cat.png"), "-m", "gradcam", "--out", str(tmp / "plain" / "out")],
                 ["export", model, "-m", "gradcam", "-o", str(tmp / "plain" / "g.onnx")]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "cannot make the output folder" in err and len(err.splitlines()) == 1, err


def test_export_makes_the_output_folder(files, capsys):
    tmp, model = files
    target = tmp / "new" / "nested" / "g.onnx"
    assert main(["export", model, "-m", "gradcam", "-o", str(target)]) == 0
    assert target.is_file() and not (tmp / "new" / "nested" / "g.onnx.part").exists()


@pytest.mark.parametrize("args,message", [
    (["--steps", "0", "-m", "ig"], "steps >= 1"),
    (["--n-samples", "0", "-m", "smoothgrad"], "n_samples >= 1"),
    (["--noise-level", "-1", "-m", "smoothgrad"], "noise_level >= 0"),
    (["--steps", "64", "-m", "gradcam"], "--steps is not used by -m gradcam"),
    (["--n-samples", "4", "--steps", "8", "-m", "ig"], "--n-samples is not used by -m ig"),
])
def test_export_settings_are_checked(files, capsys, args, message):
    tmp, model = files
    assert main(["export", model, "-o", str(tmp / "g.onnx")] + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp / "g.onnx").exists()


@pytest.mark.parametrize("command,runner", [
    ("explain", "onnxsal.explainer.Explainer.explain"),
    ("sanity", "onnxsal.evaluate.sanity.sanity_check"),
    ("evaluate", "onnxsal.evaluate.faithfulness.evaluate"),
])
def test_an_output_folder_that_cannot_be_made_is_refused_before_any_work(files, capsys, monkeypatch, command,
                                                                           runner):
    """explain, sanity and evaluate make and try --out first: a refused path costs no explaining."""
    tmp, model = files
    (tmp / "plain").write_text("a file, not a folder")

    def never(*args, **kwargs):
        raise AssertionError(f"{command} ran before it checked its output folder")

    monkeypatch.setattr(runner, never)
    assert main([command, model, str(tmp / "cat.png"), "-m", "gradcam", "--out", str(tmp / "plain" / "out"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot make the output folder '{tmp / 'plain' / 'out'}'" in err and "Not a directory" in err, err
    assert len(err.splitlines()) == 1, err


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(files, capsys, monkeypatch):
    """A folder that exists but takes no files (read-only, another user's) is tried with a scratch file first."""
    import errno
    import tempfile

    tmp, model = files
    (tmp / "ro").mkdir()

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    def never(*args, **kwargs):
        raise AssertionError("explained before the output folder was tried")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr("onnxsal.explainer.Explainer.explain", never)
    assert main(["explain", model, str(tmp / "cat.png"), "--out", str(tmp / "ro" / "new"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write into the output folder '{tmp / 'ro' / 'new'}': Permission denied" in err, err
    assert os.listdir(tmp / "ro") == []


def test_export_tries_its_output_before_building_the_graph(files, capsys, monkeypatch):
    """export's -o is tried first; the folders made for the try are gone when the run then fails."""
    tmp, model = files
    (tmp / "plain").write_text("a file, not a folder")

    def never(*args, **kwargs):
        raise AssertionError("built the graph before trying the output path")

    monkeypatch.setattr("onnxsal.export.export", never)
    assert main(["export", model, "-m", "gradcam", "-o", str(tmp / "plain" / "g.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write the model to '{tmp / 'plain' / 'g.onnx'}': cannot make the output folder" in err, err
    (tmp / "junk.onnx").write_text("not a model")
    assert main(["export", str(tmp / "junk.onnx"), "-m", "gradcam", "-o", str(tmp / "new" / "deep" / "g.onnx")]) == 2
    assert "not a readable ONNX" in capsys.readouterr().err and not (tmp / "new").exists()


@pytest.mark.parametrize("command", ["explain", "sanity", "evaluate"])
def test_a_failed_run_leaves_no_output_folder_behind(files, capsys, command):
    """The folders --out made are taken away again when the work fails; a folder that was there stays."""
    tmp, model = files
    (tmp / "junk.png").write_bytes(b"not an image")
    new = tmp / "new" / "nested"
    assert main([command, model, str(tmp / "junk.png"), "-m", "gradcam", "--out", str(new), "--quiet"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp / "new").exists()
    (tmp / "kept").mkdir()
    assert main([command, model, str(tmp / "junk.png"), "-m", "gradcam", "--out", str(tmp / "kept"), "--quiet"]) == 2
    assert (tmp / "kept").is_dir() and os.listdir(tmp / "kept") == []


@pytest.mark.parametrize("command,writer", [
    ("sanity", "onnxsal.evaluate.sanity.figure"),
    ("evaluate", "onnxsal.evaluate.commands.curves_figure"),
])
def test_a_table_or_figure_the_system_refuses_names_its_file(files, capsys, monkeypatch, command, writer):
    """A full disk while sanity or evaluate write their figure: one line naming the file, exit 2."""
    import errno

    tmp, model = files

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer, full)
    out = tmp / "o"
    assert main([command, model, str(tmp / "cat.png"), "-m", "gradcam", "--out", str(out), "--quiet",
                 "--max-steps" if command == "sanity" else "--step", "1" if command == "sanity" else "64"]) == 2
    err = capsys.readouterr().err.strip()
    name = "sanity_cat.png" if command == "sanity" else "curves.png"
    assert f"cannot write '{out / name}': No space left on device" in err and len(err.splitlines()) == 1, err
    assert "unexpected" not in err


def test_export_settings_reach_the_graph(files):
    """--steps and --n-samples are passed on when given, and export's own defaults apply otherwise."""
    import onnxruntime as ort

    from onnxsal.export import export

    tmp, model = files
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    feed = {"image": x, "target": np.array([1], np.int64)}

    def maps(graph_or_path):
        data = graph_or_path.SerializeToString() if isinstance(graph_or_path, onnx.ModelProto) else str(graph_or_path)
        return ort.InferenceSession(data).run(["map"], feed)[0]

    for args, kwargs in ((["-m", "ig", "--steps", "3"], {"steps": 3}), (["-m", "ig"], {})):
        assert main(["export", model, "-o", str(tmp / "g.onnx")] + args) == 0
        np.testing.assert_array_equal(maps(tmp / "g.onnx"), maps(export(onnx.load(model), "ig", **kwargs)))
    assert not np.array_equal(maps(export(onnx.load(model), "ig", steps=3)), maps(export(onnx.load(model), "ig")))
