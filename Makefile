# Quick start: `make train` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
TEST_WORKERS ?= 2

.PHONY: train test venv clean bench

venv: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt -r requirements-test.txt
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	$(VENV)/bin/python -m glm_jax.quant.cpu_kernel  # prebuild the CPU int8/int4 matmul kernel (its cache dir)
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/glm-train --config train/configs/default.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=20 tests

clean:
	rm -rf $(VENV) runs
