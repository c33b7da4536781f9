# Two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0

.PHONY: demo test bench install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,ray]"
	touch $@

install: $(VENV)/.installed

# trains on 2 workers, then samples from the checkpoint on them; `$(PY) examples/generate.py out/demo-llama --plain`
# prints the same samples with transformers alone (onegpu not imported)
demo: install
	$(VENV)/bin/onegpu run --workers 2 examples/train_llama.py --out out/demo-llama
	$(VENV)/bin/onegpu run --workers 2 examples/generate.py out/demo-llama

# two test files at a time (pytest-xdist): the launches wait on I/O and rendezvous
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

bench: install
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) out
