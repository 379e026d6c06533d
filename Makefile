# `make demo` and `make test` set everything up on a fresh machine (python3 with venv is all they need).
# STACK picks the installed stack (docs/design.md, "The stack"): `pinned` (the default) is exactly what Composer
# 0.32.1 and Streaming 0.13.0 declare, in .venv/; `current` is today's torch, transformers, huggingface-hub,
# numpy, datasets and wandb over their caps, in .venv-current/. Each installs exactly its lock file, stacks/*.txt.
PYTHON ?= python3
STACK  ?= pinned
VENV   := $(if $(filter pinned,$(STACK)),.venv,.venv-$(STACK))
LOCK   := stacks/$(STACK).txt
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo

ifeq ($(wildcard $(LOCK)),)
$(error STACK=$(STACK) has no lock file $(LOCK): use STACK=pinned or STACK=current)
endif

.PHONY: venv lock data demo test test-fast test-hosts test-hostile test-stack lint docs bench clean

# pip brings uv (the version the lock names), uv installs the lock exactly and removes what it does not name,
# compiled to bytecode as pip does (with PYTHONDONTWRITEBYTECODE set, every process would compile torch and
# transformers again: twice the start-up). Again only when the lock or the package metadata changed.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$$(grep '^uv==' $(LOCK))"
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(BIN)/python $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Resolve both lock files again (needs the package index): after a change to pyproject.toml's dependencies or
# to stacks/current-overrides.txt, or to move the current stack to newer releases. Commit what it writes. The
# current stack also has the analysis extra (nnsight, TransformerLens, lm-eval: transformers 5 only).
LOCK_ARGS := pyproject.toml --extra dev --universal --quiet
lock: $(STAMP)
	$(BIN)/uv pip compile $(LOCK_ARGS) --python-version 3.10 -o stacks/pinned.txt
	$(BIN)/uv pip compile $(LOCK_ARGS) --extra analysis --python-version 3.11 \
		--override stacks/current-overrides.txt -o stacks/current.txt

# The suite's data, where yamls/base.yaml looks for it: the embedded corpus (20,000 stories), a byte-level BPE
# tokenizer asked for the suite's 4,096 tokens (the corpus gives 1,141), and MDS shards of 512 tokens (95 % train,
# 5 % validation), as README's "The pipeline" makes them. About 20 s on 2 cores. File targets: a second `make data`
# does nothing; a new corpus generator (slm/data/corpus.py) makes it all again.
DATA      := data
TOKENIZER := data/tokenizer
NUM_DOCS  := 20000
SHARDS    := $(DATA)/mds/train/index.json $(DATA)/mds/validation/index.json

data: export HF_HUB_OFFLINE = 1
data: $(SHARDS)

$(DATA)/stories.jsonl: slm/data/corpus.py | $(STAMP)
	$(BIN)/slm corpus --out $@ --num-docs $(NUM_DOCS) --overwrite

$(TOKENIZER)/tokenizer.json: $(DATA)/stories.jsonl
	$(BIN)/slm tokenizer -i $< -f story -s train -v 4096 --out-dir $(@D) --overwrite

$(DATA)/mds/train/index.json: $(DATA)/stories.jsonl $(TOKENIZER)/tokenizer.json
	$(BIN)/slm tokenize -i $< -f story -s 'train[:95%]' -t $(TOKENIZER) -l 512 --out-dir $(@D) --overwrite

$(DATA)/mds/validation/index.json: $(DATA)/stories.jsonl $(TOKENIZER)/tokenizer.json
	$(BIN)/slm tokenize -i $< -f story -s 'train[95%:]' -t $(TOKENIZER) -l 512 --out-dir $(@D) --overwrite

# The main job on the embedded corpus: stories -> tokenizer -> MDS shards -> train demo-llama and
# demo-mamba (killed mid-run, then resumed with the same run_name) -> export demo-llama, evaluate it,
# sample a story from it, plot both runs' curves, show their status and one step's samples, then demo-llama's
# per-token learning dynamics (slm dynamics, and one line of the Python API).
# Everything lands in $(DEMO)/; `make data` first.
demo: export HF_HUB_OFFLINE = 1
demo: $(STAMP) data
	rm -rf $(DEMO)/checkpoints $(DEMO)/logprobs
	$(BIN)/slm corpus --out $(DEMO)/stories.jsonl --num-docs 20000 --overwrite
	$(BIN)/slm tokenizer -i $(DEMO)/stories.jsonl -f story -v 1024 --out-dir $(DEMO)/tokenizer --overwrite
	$(BIN)/slm tokenize -i $(DEMO)/stories.jsonl -f story -s 'train[:95%]' -t $(DEMO)/tokenizer -l 256 \
		--out-dir $(DEMO)/mds/train --overwrite
	$(BIN)/slm tokenize -i $(DEMO)/stories.jsonl -f story -s 'train[95%:]' -t $(DEMO)/tokenizer -l 256 \
		--out-dir $(DEMO)/mds/validation --overwrite
	$(BIN)/python slm/train.py yamls/demo-llama.yaml
	@echo "== demo-mamba: SIGKILL after 45 s, then the same command again resumes it =="
	-timeout -s KILL 45 $(BIN)/python slm/train.py yamls/demo-mamba.yaml
	$(BIN)/slm status $(DEMO)/checkpoints/demo-mamba
	$(BIN)/python slm/train.py yamls/demo-mamba.yaml
	$(BIN)/slm export $(DEMO)/checkpoints/demo-llama/latest-rank0.pt --out-dir $(DEMO)/hf/demo-llama --overwrite
	@echo "== demo-llama on the validation shards =="
	$(BIN)/slm eval $(DEMO)/hf/demo-llama --data $(DEMO)/mds/validation
	@echo "== a story from demo-llama =="
	@$(BIN)/slm generate $(DEMO)/hf/demo-llama --prompt "Once upon a time" --max-new-tokens 250 --seed 0
	$(BIN)/slm plot $(DEMO)/checkpoints/demo-llama $(DEMO)/checkpoints/demo-mamba --out $(DEMO)/curves.png
	@echo "== the two runs =="
	$(BIN)/slm status $(DEMO)/checkpoints/demo-llama $(DEMO)/checkpoints/demo-mamba
	@echo "== the samples demo-llama trained on at step 300, and the stories (by index) each was cut from =="
	$(BIN)/slm batches $(DEMO)/checkpoints/demo-llama --steps 300 --documents
	@echo "== per-token log-probs and learning dynamics of demo-llama on 64 validation samples =="
	$(BIN)/slm logprobs $(DEMO)/checkpoints/demo-llama --data $(DEMO)/mds/validation --max-samples 64 \
		--out-dir $(DEMO)/logprobs/demo-llama
	$(BIN)/slm dynamics $(DEMO)/checkpoints/demo-llama --data $(DEMO)/mds/validation --max-samples 64 \
		--logprobs $(DEMO)/logprobs/demo-llama --out $(DEMO)/dynamics.parquet --plot $(DEMO)/dynamics.png --overwrite
	@echo "== from Python (docs/analysis.md): the most frequent tokens, their final loss and age of acquisition =="
	$(BIN)/python -c 'import slm; run = slm.open("$(DEMO)/checkpoints/demo-llama")["demo-llama"]; \
		dynamics = run.dynamics("$(DEMO)/mds/validation", max_samples=64, logprobs="$(DEMO)/logprobs/demo-llama"); \
		print(dynamics.per_token().to_pandas().nlargest(5, "count").drop(columns="mean_losses").to_string(index=False))'
	@echo "Shards: $(DEMO)/mds/{train,validation}. Checkpoints, metrics.jsonl and run.json:" \
		"$(DEMO)/checkpoints/demo-{llama,mamba}. Export: $(DEMO)/hf/demo-llama. Curves: $(DEMO)/curves.png." \
		"Dynamics: $(DEMO)/dynamics.parquet, $(DEMO)/dynamics.png."
	@echo "The suite's data: $(DATA)/mds/{train,validation} (tokenizer $(TOKENIZER), 512 tokens a sample), which" \
		"yamls/*.yaml train on: composer -n 2 slm/train.py yamls/mamba-100k.yaml"

lint: $(STAMP)
	$(BIN)/ruff check slm tests bench clean_shared_memory.py
	for job in jobs/*; do bash -n $$job || exit 1; done

PYTEST := HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q

# Every test but the two-host ones, the training, cluster and root ones included. The cluster tests and
# those marked `beside`, which spend much of their time waiting on schedulers or training subprocesses, run in a
# second pytest session beside the others (temporary folders of its own); its report follows. Each session names
# its 8 slowest tests. One thread a process (OMP_NUM_THREADS=1): torch's threads spin while they wait, and with
# more processes than cores a two-thread process burns its core waiting on a descheduled thread (the chaos test
# beside one busy process: 353 s with two threads, 112 s with one). The two-host tests (`hosts`) are not in it:
# with them it ran 1,433 to 1,652 s, past its 25 minutes, and they timed out under the load (docs/testing.md);
# `make test-hosts` runs them alone, and .ci/run runs it after make test.
# BUSY=N keeps N other processes spinning on the CPU meanwhile: the suite as on a shared machine.
BUSY ?= 0
test: lint
	@log=$$(mktemp); export OMP_NUM_THREADS=1; \
	TMPDIR=$$(mktemp -d) $(PYTEST) --durations=8 -m "cluster or beside" >$$log 2>&1 & second=$$!; \
	echo "$(PYTEST) -m 'not (cluster or beside or hosts or hostile)' --busy $(BUSY), and beside it: $(PYTEST) -m 'cluster or beside'"; \
	$(PYTEST) --durations=8 -m "not (cluster or beside or hosts or hostile)" --busy $(BUSY); status=$$?; \
	wait $$second || status=1; \
	echo "== the second session: $(PYTEST) -m 'cluster or beside' =="; cat $$log; rm -f $$log; \
	exit $$status

# The two-host tests alone (pytest -m hosts; root): one run across two test hosts (network namespaces) under
# Slurm and SGE. Asked for by name, so they fail rather than skip where they cannot run (not root, no apt-get).
test-hosts: lint
	SLM_HOSTS_REQUIRED=1 $(PYTEST) -m hosts

# The whole hostile-input sweep (docs/security.md, "The hostile-input harness"): every variant of every kind of input
# under every command that reads it; make test runs a fixed sample of it. It prints its counts per kind and command.
test-hostile: lint
	OMP_NUM_THREADS=1 HOSTILE_LANES=2 $(PYTEST) -s -m hostile

# The tests of what differs between the stacks (pytest -m stack): CI runs them on the current stack.
test-stack: lint
	$(PYTEST) -m stack

# The tests that train no model, need no scheduler and no root: about 2 minutes, for the edit-test loop.
test-fast: lint
	$(PYTEST) -m "not train and not cluster and not root"

# docs/config.md, the config reference, from the schema in slm/core/config.py by slm/core/config_reference.py (tests/test_docs.py fails when it is stale).
docs: $(STAMP)
	$(BIN)/python -m slm.core.config_reference > docs/config.md

# Every benchmark (about 30 minutes on 2 cores) -> bench/RESULTS.md.
bench: export HF_HUB_OFFLINE = 1
bench: $(STAMP)
	$(BIN)/python bench/report.py

# What `make demo` and `make data` made; other data under $(DATA)/ (your own shards) stays.
clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache $(DATA)/stories.jsonl $(DATA)/mds/train $(DATA)/mds/validation $(TOKENIZER)
	rmdir $(DATA)/mds $(DATA) $(dir $(TOKENIZER)) 2>/dev/null || true
