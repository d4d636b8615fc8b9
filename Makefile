# Every target sets up what it needs in a local virtual environment (.venv) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs
EXTRAS ?= serve,train,dev,fast

.PHONY: install demo demo-web test test-fast test-deploy lint format protos docs bench bench-resize clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	scripts/install.sh $(VENV) $(EXTRAS) --editable
	touch $@

# The main job on the bundled default: train on digits (or reuse the run), export, serve, classify.
demo: $(STAMP)
	$(PY) -m training train --dataset digits --out runs/digits --reuse
	test -f models/digits/1/model.onnx || $(PY) -m training export runs/digits --repository models --name digits
	$(PY) scripts/demo.py --models models --run runs/digits
	@echo "run report (filters, activation maps, mistakes): $(CURDIR)/runs/digits/report.html"

# The demo, then the server stays up with its web page (drop an image, see the top-k and why) until Ctrl-C.
demo-web: $(STAMP)
	$(PY) -m training train --dataset digits --out runs/digits --reuse
	test -f models/digits/1/model.onnx || $(PY) -m training export runs/digits --repository models --name digits
	$(PY) scripts/demo.py --models models --run runs/digits --keep-serving

# mypy type-checks serving/ and training/ as [tool.mypy] in pyproject.toml says (zero errors).
# The docs build in strict mode: a broken link, a missing page or a nav entry without a file fails.
# It does not regenerate the reference pages: tests/test_docs.py fails when they are stale. (Not
# --quiet: it hides the warnings from the count that strict mode fails on.)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(MKDOCS) build --strict

test: lint
	scripts/system-deps.sh
	scripts/k8s-tools.sh
	$(PY) -m pytest -q

# The inner loop: the tests that need no apt step, no package registry and no deployment, under a
# minute here. `make test` still runs everything CI runs.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow and not deploy and not network"

# The compose deployment run for real: base images (stand-ins when no registry answers), the images,
# every profile, scaling and stopping under load, `down` (tests/test_compose_run.py). Docker where
# its engine answers, else podman (installed by scripts/container-engine.sh).
test-deploy: $(STAMP)
	scripts/container-engine.sh install
	$(PY) -m pytest -q -m deploy tests/test_compose_run.py

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

protos: $(STAMP)
	$(PY) -m protos.generate

# The reference pages from the code (flags, metrics, model.json, errors, --help), then the site in site/.
docs: $(STAMP)
	$(PY) -m scripts.docs_reference
	$(MKDOCS) build --strict

# Reference models with random weights (built once), then the benchmark: writes benchmarks/RESULTS.md.
bench: $(STAMP)
	$(PY) -m training reference digits --repository benchmarks/models
	$(PY) -m training reference resnet18 --repository benchmarks/models
	$(PY) -m serving bench --models benchmarks/models $(BENCH_FLAGS)

# The ResNet-18 PNG scenarios with each resize mode, on 48x40 PNGs the server must resize (and pad or
# crop): letterbox and crop may cost at most 10 % more server CPU per image than stretch.
bench-resize: $(STAMP)
	$(PY) -m training reference resnet18 --repository benchmarks/models
	$(PY) -m training reference resnet18 --resize letterbox --repository benchmarks/models
	$(PY) -m training reference resnet18 --resize crop --repository benchmarks/models
	$(PY) -m serving bench --models benchmarks/models --model resnet18 --model resnet18-letterbox \
		--model resnet18-crop --image-size 48x40 --scenario "unary c64 png" --scenario "stream 32/msg png" \
		--out benchmarks/RESIZE.md --json benchmarks/resize.json $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) runs models site .pytest_cache .ruff_cache .mypy_cache
