# Set-up is two commands: `make serve` (virtualenv, install, serve tf_files/demo) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: bench-attacks bench-fairness bench-grpc bench-onnx bench-workers bench-peers venv serve test test-fast test-alone test-long fuzz reliability demo canvas-drawings bench clean \
	docker test-docker

venv: $(VENV)/.installed $(VENV)/.tfserving-api

# onnxruntime-web for the page's "run in this browser" (static/vendor/, not committed; npm,
# pinned version and integrity). Without npm the page just does not offer the switch.
vendor:
	-scripts/vendor_ort.sh

# A changed requirements file means a fresh venv (--clear): pip install never removes what a
# requirement no longer brings (such as a second TensorFlow).
$(VENV)/.installed: requirements.txt requirements-train.txt requirements-dev.txt
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -r requirements-train.txt -r requirements-dev.txt
	$(BIN)/pip check
	touch $@

# TF Serving's gRPC stubs (tensorflow_serving.apis: the PredictionService and ModelService that
# common/rpc/tfserving.py serves and tests/test_grpc.py calls). Its wheel requires the full
# `tensorflow`, which must never sit beside tensorflow-cpu, so only its package folder is copied
# into the venv, without its dist-info: pip neither installs its requirements nor lists it, and
# `pip check` stays clean. Its modules import their TensorFlow protos from tensorflow-cpu.
TFSERVING_API = tensorflow-serving-api==2.21.0
$(VENV)/.tfserving-api: $(VENV)/.installed
	rm -rf build/tfserving-api
	$(BIN)/pip install --quiet --no-deps --no-compile --target build/tfserving-api $(TFSERVING_API)
	site=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
	    rm -rf "$$site/tensorflow_serving" && cp -r build/tfserving-api/tensorflow_serving "$$site/"
	$(BIN)/pip check
	touch $@

serve: venv vendor
	$(BIN)/gunicorn -c gunicorn.conf.py 'app:create_app()'

# Everything: a sample of tests run one by one (each must pass alone), then the whole suite.
test: venv vendor
	$(BIN)/python scripts/check_isolation.py --sample 12
	$(BIN)/python -m pytest

# The in-process tests only (seconds): no real server, no browser.
test-fast: venv
	$(BIN)/python -m pytest -m "not server and not long"

# The Docker image on the base pinned by digest (scripts/docker_base.sh prints its immutable
# reference: the Dockerfile's pinned digest, or a stand-in it makes where no registry is
# reachable), labelled with this checkout's version, commit and origin.
IMAGE ?= image-classifier:dev
docker:
	base=$$(scripts/docker_base.sh) && docker build -t $(IMAGE) --build-arg BASE_IMAGE=$$base \
	    --build-arg VERSION=$$(git describe --always --dirty 2>/dev/null || echo dev) \
	    --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	    --build-arg SOURCE=$$(git remote get-url origin 2>/dev/null || echo unknown) .

# The image, compose and Kubernetes tests (docs/DEPLOY.md): build and run the real image, nginx
# in front of replicas, manifests validated. Needs a Docker engine; `.ci/run` starts one.
test-docker: venv
	$(BIN)/python -m pytest -m docker

# Every test alone in its own process (not in CI: tens of minutes).
test-alone: venv
	$(BIN)/python scripts/check_isolation.py --all

# Longer versions of the reliability runs (about 11 minutes; not in CI): fresh hypothesis and
# schemathesis examples, 2 minutes of overload, 50,000 soak requests. See docs/RELIABILITY.md.
test-long: venv
	HYPOTHESIS_PROFILE=long CONTRACT_EXAMPLES=1000 CONTRACT_SEED=$$(date +%s) \
	OVERLOAD_SECONDS=120 SOAK_REQUESTS=50000 \
	$(BIN)/python -m pytest tests/test_fuzz.py tests/test_contract.py tests/test_load.py

# Coverage-guided fuzzing of the upload path with atheris (5 minutes; not in CI).
fuzz: venv
	$(BIN)/pip install -q atheris==3.0.0
	$(BIN)/python scripts/fuzz_upload.py -max_total_time=300 -timeout=2

# docs/RELIABILITY.md's figures from the last test run (build/reliability/*.json).
reliability:
	$(BIN)/python scripts/reliability_report.py

demo: venv
	$(BIN)/python scripts/build_demo.py

# The demo's independent test set: shapes drawn with pointer strokes in the real page in headless
# Chromium (needs chromium and chromium-driver), into tf_files/canvas_drawings/ (a few minutes).
# Never trained on; `make demo` measures the demo on it.
canvas-drawings: venv
	$(BIN)/python scripts/make_canvas_drawings.py

# Benchmarks (minutes, not part of the tests): random-weight Inception v3 / MobileNetV2 folders,
# then the server against the in-process model; see docs/BENCHMARKS.md.
build/models/inception_v3/saved_model.pb: | venv
	$(BIN)/python scripts/make_inception_model.py --arch inception_v3 --output_dir build/models/inception_v3

build/models/mobilenet_v2/saved_model.pb: | venv
	$(BIN)/python scripts/make_inception_model.py --arch mobilenet_v2 --output_dir build/models/mobilenet_v2

bench: build/models/inception_v3/saved_model.pb build/models/mobilenet_v2/saved_model.pb
	$(BIN)/pip install -q py-spy==0.4.3  # the profiles (--profile, --refusal-cpu); wrk: apt-get install wrk
	$(BIN)/python scripts/benchmark.py --model build/models/inception_v3 --env RUNTIME=tensorflow --concurrency 1,16,64 --large-concurrency 1 --duration 20 --refusal-cpu 5 --profile 10 --swap 20 --json build/bench/inception.json
	$(BIN)/python scripts/benchmark.py --model build/models/mobilenet_v2 --env RUNTIME=tensorflow --concurrency 1,16 --large-concurrency "" --duration 20 --json build/bench/mobilenet.json
	$(BIN)/python scripts/benchmark.py --model build/models/inception_v3 --duration 10 --concurrency 1,16 --large_concurrency "" --env PRECISION=bf16 --env RUNTIME=tensorflow --json build/bench/inception_bf16.json
	$(BIN)/python scripts/bf16_check.py --speed_model build/models/inception_v3

# The same on ONNX Runtime (RUNTIME=auto's choice once a folder has a verified model.onnx).
bench-onnx: build/models/inception_v3/saved_model.pb build/models/mobilenet_v2/saved_model.pb
	$(BIN)/python scripts/export.py --model build/models/inception_v3 --format onnx --generated 16
	$(BIN)/python scripts/export.py --model build/models/mobilenet_v2 --format onnx --generated 32
	$(BIN)/python scripts/benchmark.py --model build/models/inception_v3 --env RUNTIME=onnx --concurrency 1,16,64 --large-concurrency "" --duration 20 --json build/bench/inception_onnx_admission.json
	$(BIN)/python scripts/benchmark.py --model build/models/mobilenet_v2 --env RUNTIME=onnx --concurrency 1,16 --large-concurrency "" --duration 20 --json build/bench/mobilenet_onnx_admission.json

# Workers x runtime threads on this machine (docs/BENCHMARKS.md, "Workers sized to the machine"):
# the ONNX MobileNetV2 at 1, 16 and 64 clients for each setting, and WORKERS=auto's choice.
bench-workers: build/models/mobilenet_v2/saved_model.pb
	$(BIN)/python scripts/export.py --model build/models/mobilenet_v2 --format onnx --generated 32
	$(BIN)/python scripts/benchmark.py --model build/models/mobilenet_v2 --env RUNTIME=onnx --concurrency 1,16,64 --duration 20 --sweep $(SWEEP) --json build/bench/workers.json

SWEEP ?= 1x2,2x1,auto

# Our service beside KServe's Python model server, LitServe and BentoML on the same model.onnx,
# each peer in its own virtualenv under build/peers/ (made on first use, a few minutes; the run
# itself about 8 minutes; docs/BENCHMARKS.md, "Peers side by side"). Needs wrk.
bench-peers: build/models/mobilenet_v2/saved_model.pb
	$(BIN)/python scripts/export.py --model build/models/mobilenet_v2 --format onnx --generated 32
	$(BIN)/python scripts/bench_peers.py --model build/models/mobilenet_v2 --concurrency 1,16,64 --duration 20 --json build/bench/peers.json --markdown build/bench/peers.md

# REST beside gRPC on one server: the ONNX MobileNetV2 at 1, 16 and 64 clients, /classify with
# wrk and Triton's ModelInfer with h2load (apt-get install wrk nghttp2-client; ~3 minutes;
# docs/BENCHMARKS.md, "gRPC beside REST").
bench-grpc: build/models/mobilenet_v2/saved_model.pb
	$(BIN)/python scripts/export.py --model build/models/mobilenet_v2 --format onnx --generated 32
	$(BIN)/python scripts/benchmark.py --model build/models/mobilenet_v2 --concurrency 1,16,64 --large_concurrency "" --grpc 1,16,64 --duration 15 --inprocess_batches 1,8,32 --json build/bench/grpc_rest.json

# One greedy client (60 connections) beside four polite ones, the fair share on and off, two
# workers (~5 minutes; docs/BENCHMARKS.md, "Fair share per client").
bench-fairness: build/models/mobilenet_v2/saved_model.pb
	$(BIN)/python scripts/export.py --model build/models/mobilenet_v2 --format onnx --generated 32
	$(BIN)/python scripts/bench_fairness.py --model build/models/mobilenet_v2 --duration 20 --env WORKERS=auto --json build/bench/fairness.json

# Hostile requests against the real server: bombs, protocol bodies, slow clients, metric
# series (a few minutes; docs/BENCHMARKS.md, "Hostile requests").
bench-attacks: venv
	$(BIN)/python scripts/attacks.py --model tf_files/demo --json build/attacks.json

clean:
	rm -rf $(VENV) .pytest_cache build
