# medssl: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
DEMO   ?= demo

.PHONY: organs-model demo test test-fast lint docs setup setup-test system-deps triton-env ohif openvino-env openvino-score-env clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip
	# torch first, pinned: the local CPU wheel. An unpinned torch pulls gigabytes of CUDA wheels.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[train,serve]"
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install -e ".[train,serve,scale,test]"
	touch $@

# ruff and mypy beside the packages the core imports (mypy reads their types).
$(VENV)/.lint: $(VENV)/.core
	$(PIP) install -e ".[train,serve,scale,lint]"
	touch $@

$(VENV)/.docs: $(VENV)/.core
	$(PIP) install -e ".[train,serve,docs]"
	touch $@

setup: $(VENV)/.core

setup-test: $(VENV)/.test system-deps triton-env ohif organs-model

# The OHIF viewer tests/medssl/dicom/test_viewer_ohif.py opens our SR in: the prebuilt app of npm
# @ohif/app (50 MB tarball, its package/dist is the site), unpacked under .cache/ohif/.
OHIF_VERSION := 3.13.2
.cache/ohif/$(OHIF_VERSION).stamp:
	rm -rf .cache/ohif && mkdir -p .cache/ohif
	cd .cache/ohif && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null && tar xzf ohif-app-$(OHIF_VERSION).tgz && rm ohif-app-$(OHIF_VERSION).tgz
	touch $@

ohif: .cache/ohif/$(OHIF_VERSION).stamp

# The Triton env: a separate venv whose nvidia-pytriton wheel bundles the real tritonserver
# the serving tests start (medssl.runners.LocalTritonServer). Its Python backend stub needs
# numpy<2; 0.6.0 because 0.7 has no stub for Python 3.11. onnxruntime runs the test model.
.venv-triton/.stamp:
	$(PYTHON) -m venv .venv-triton
	.venv-triton/bin/python -m pip --disable-pip-version-check -q install "numpy<2" nvidia-pytriton==0.6.0 onnxruntime
	touch $@

triton-env: .venv-triton/.stamp

# For benchmarks/export_speed.py only: onnxruntime's OpenVINO provider ships in its own wheel,
# which cannot share a venv with onnxruntime.
openvino-env:
	$(PYTHON) -m venv .venv-openvino
	.venv-openvino/bin/python -m pip --disable-pip-version-check -q install onnxruntime-openvino numpy

# For benchmarks/score_throughput.py's medssl-openvino side: medssl's scoring with
# onnxruntime-openvino in place of onnxruntime (what a CPU-only scoring machine installs).
openvino-score-env:
	$(PYTHON) -m venv .venv-openvino-score
	.venv-openvino-score/bin/python -m pip --disable-pip-version-check -q install -e . onnxruntime-openvino

# Validators, DICOM tools, the PACS (Orthanc) and the browser (chromium, for OHIF) the tests use; installed when running as root
# (CI, fresh machines). The Debian package also starts an Orthanc service on ports 4242/8042;
# the tests start their own instances on free ports and do not use it.
system-deps:
	@if [ "$$(id -u)" = "0" ] && ! { command -v dciodvfy && command -v dcmcjpeg && command -v Orthanc && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && command -v chromium; } >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools dcmtk orthanc orthanc-dicomweb chromium >/dev/null; \
	fi
	@command -v dciodvfy >/dev/null 2>&1 || echo "note: dciodvfy not found; DICOM validation tests will be skipped (apt-get install dicom3tools)"
	@command -v dcmcjpeg >/dev/null 2>&1 || echo "note: dcmtk not found; JPEG Lossless tests will be skipped (apt-get install dcmtk)"
	@command -v Orthanc >/dev/null 2>&1 || echo "note: Orthanc not found; the gateway's PACS tests will be skipped (apt-get install orthanc)"

# The shipped organ segmenter is generated, not committed (9 MB of weights):
# benchmarks/build_default_models.sh organs rebuilds it from nothing in about 22 min on 2 cores,
# once; later runs find it.
ORGANS_MODEL := model_repository/abdomen-organs/1/model.onnx
$(ORGANS_MODEL): | $(VENV)/.core
	benchmarks/build_default_models.sh organs

organs-model: $(ORGANS_MODEL)

# The main job: a synthetic chest CT study as DICOM, its header index, its geometry and its
# findings from the shipped detector (medssl-score, embedded runtime: OpenVINO on a CPU); a
# synthetic abdominal CT study segmented by the shipped organ model (organ volumes in mL, a DICOM
# SEG; its card's selection takes the 4 mm slices); then a
# short FocalMix run (labeled + unlabeled synthetic LUNA16 scans) that ends with a LUNA16
# submission and CPM report. 30 steps of a small network: it shows the machinery, not accuracy
# (docs/how-to/train-focalmix.md for real runs). Then it exports that run to a Triton model
# repository with its parity check, and checks it and the shipped one.
DEMO_TRAIN := --config focalmix-cpu --set optim.steps=30 --set eval.every=15 \
	--set data.n_validation=1 --set 'data.test_subsets=[9]' --set eval.bootstrap=100
demo: setup $(ORGANS_MODEL)
	rm -rf $(DEMO)
	$(VENV)/bin/medssl synth chest --cases 1 --format dicom $(DEMO)/dicom
	$(VENV)/bin/medssl index $(DEMO)/dicom --out $(DEMO)/index.parquet
	$(VENV)/bin/medssl info "$$(dirname "$$(find $(DEMO)/dicom -name 'IM00001.dcm' | head -1)")"
	$(VENV)/bin/medssl-score $(DEMO)/dicom --out $(DEMO)/scores --workers 1 --write-dicom
	$(VENV)/bin/medssl synth organs --cases 1 --format dicom --seed 900 $(DEMO)/abdomen
	$(VENV)/bin/medssl-score "$$(dirname "$$(find $(DEMO)/abdomen -name 'IM00001.dcm' | head -1)")" \
		--model abdomen-organs --out $(DEMO)/abdomen-scores --workers 1 --write-dicom
	$(VENV)/bin/medssl synth chest --cases 10 --unlabeled 4 --matrix 96 --slices 64 --seed 100 $(DEMO)/luna16
	MEDSSL_CACHE=$(DEMO)/cache $(VENV)/bin/medssl-train focalmix $(DEMO_TRAIN) --data $(DEMO)/luna16 \
		--labeled 6 --unlabeled 4 --out $(DEMO)/focalmix
	@echo "FocalMix run: $(DEMO)/focalmix (submission: test/submission.csv, report: test/cpm.json, froc.png)"
	$(VENV)/bin/medssl-export $(DEMO)/focalmix --repository $(DEMO)/model_repository --name focalmix-demo --kind cpu
	$(VENV)/bin/medssl synth organs --cases 6 --test 2 --seed 500 $(DEMO)/organs/A
	MEDSSL_CACHE=$(DEMO)/cache $(VENV)/bin/medssl-train ad --setting ssl --profile cpu --data $(DEMO)/organs \
		--out $(DEMO)/ad --set optim.steps=20 --set eval.every=10 --set data.patch=[16,32,32] --set data.workers=0
	$(VENV)/bin/medssl-export $(DEMO)/ad --repository $(DEMO)/model_repository --name ad-demo --kind cpu
	$(VENV)/bin/medssl-score $(DEMO)/organs/A --repository $(DEMO)/model_repository --model ad-demo \
		--out $(DEMO)/organ-scores --workers 1
	$(VENV)/bin/medssl-export check $(DEMO)/model_repository model_repository
	$(VENV)/bin/medssl-serve --config examples/gateway.yaml --check

test: setup-test
	$(PY) -m pytest -q

# The unit tests: no real servers, browsers, distributed runs or training runs (markers in
# pyproject.toml; each heavy module says what it is with pytestmark). Minutes, not a quarter hour.
FAST := not (integration or orthanc or triton or ddp or browser or slow)
test-fast: $(VENV)/.test
	$(PY) -m pytest -q -m "$(FAST)"

# The documentation site (mkdocs.yml): README.md is its home page, the CLI and config-key
# references are generated from the code, and --strict fails the build on any broken link
# (between pages, to an anchor, from the README, or to a repository file). Output: build/site.
# The lint gate (.ci/run): ruff's rules and formatting everywhere, mypy on the core (pyproject.toml).
lint: $(VENV)/.lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

docs: $(VENV)/.docs
	$(VENV)/bin/mkdocs build --strict --clean --config-file mkdocs.yml

clean:
	rm -rf $(VENV) .venv-triton .venv-openvino .venv-openvino-score $(DEMO) .pytest_cache
