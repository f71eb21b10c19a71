# musicrl_jax — set-up: `make install && make demo`; tests: `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
# Compiled XLA programs persist here: the demo's later stages and runs, `make evidence` and
# `make rounds` load what an earlier one compiled instead of compiling it again.
XLA_CACHE ?= data_cache/xla_compilation_cache
RUN := JAX_COMPILATION_CACHE_DIR=$(XLA_CACHE) $(PY)
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Tests shard over 8 virtual CPU devices so every sharding path runs.
TEST_XLA_FLAGS ?= --xla_force_host_platform_device_count=8

APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq

.PHONY: install system-deps browser-deps demo test bench evidence rounds clean

install: system-deps $(VENV)/.installed

system-deps:
	@if ! command -v fluidsynth >/dev/null || [ ! -f /usr/share/sounds/sf2/TimGM6mb.sf2 ]; then \
	  echo "Installing FluidSynth and a General MIDI soundfont (apt-get)"; \
	  $(APT_INSTALL) fluidsynth timgm6mb-soundfont; \
	fi

# Headless Chromium for the listening page's browser test only (not needed to train or serve).
browser-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "Installing headless Chromium and chromedriver for the browser test (apt-get)"; \
	  $(APT_INSTALL) chromium chromium-driver; \
	fi

$(VENV)/.installed: setup.py requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: install
	$(RUN) -m musicrl_jax.main --gin_file=local/demo.gin --gin_bindings="RUN_DIR='$(RUN_DIR)'"

# The studies of docs/RESULTS.md on the demo's LM (run `make demo` first); resumable.
evidence: install
	$(RUN) -m musicrl_jax.main --gin_file=evidence/reward_scaling.gin \
	  --gin_bindings="reward_scaling.lm_dir='$(RUN_DIR)/pretrain'"
	$(RUN) -m musicrl_jax.main --gin_file=evidence/overoptimisation.gin \
	  --gin_bindings="overoptimisation.lm_dir='$(RUN_DIR)/pretrain'"
	$(RUN) -m musicrl_jax.main --gin_file=evidence/headline.gin \
	  --gin_bindings="headline.lm_dir='$(RUN_DIR)/pretrain'"

# Three feedback rounds on the demo's LM (run `make demo` first): the rater panel votes over the
# listening page, rewards retrain, RL, redeploy; report and win-rate plot in RUN_DIR/rounds.
rounds: install
	$(RUN) -m musicrl_jax.rounds run --gin_file=local/rounds.gin \
	  --gin_bindings="feedback_rounds.pretrained_lm='$(RUN_DIR)/pretrain'" \
	  --rounds_dir $(RUN_DIR)/rounds

# torch (CPU) and transformers: the MusicGen/EnCodec converters' equality tests only.
$(VENV)/.test-installed: $(VENV)/.installed requirements-test.lock
	$(PY) -m pip install -q -r requirements-test.lock
	touch $@

test: install browser-deps $(VENV)/.test-installed
	XLA_FLAGS=$(TEST_XLA_FLAGS) $(PY) -m pytest -q --durations=15 tests

# The benchmarks' comparisons with transformers and TRL (CPU torch), same pins as the tests'.
bench: install
	$(PY) -m pip install -q -r requirements-bench.lock
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/rl_vs_trl.py

clean:
	rm -rf runs
