# The two commands of the README: `make demo` (the main job on the embedded default) and `make test`.
# Both install first (idempotent: a second run only checks).
PY := .venv/bin/python

.PHONY: install demo test test-fast test-slow lint gpu-check ablation stack-up stack-down clean

install:
	bash infra/install.sh

# The demo's jobs go to the cluster and server named by RAY_ADDRESS / MLFLOW_TRACKING_URI: here the local stack,
# stopped afterwards unless KEEP_STACK=1 (then `make stack-down`).
demo: install
	$(PY) -m infra.stack up --services ray,mlflow --ray-num-cpus 6
	eval "$$($(PY) -m infra.stack env)" && $(PY) -m jobs.demo; rc=$$?; \
	  if [ -z "$(KEEP_STACK)" ]; then echo "[demo] stopping the local stack (Ray, the Serve app, MLflow): KEEP_STACK=1 make demo keeps it up"; \
	    $(PY) -m infra.stack down; \
	  else echo "[demo] the local stack stays up (eval \"\$$($(PY) -m infra.stack env)\" for its addresses; make stack-down stops it)"; fi; exit $$rc

test: install
	$(PY) -m pytest

lint: install   # the house rules: ruff (style, function size, banned process-wide APIs), import contracts
	.venv/bin/ruff check .
	.venv/bin/lint-imports

test-slow: install   # the tests too long for the suite (CI runs them after it): the shortened ablation miniature (~4.5 min), the two-node training job (~4 min), the evaluation job (~5 min), gpu-check at tiny size (~1.5 min), the non-Gemma training jobs (~2 min), the README's serving commands (~1 min), the content-learning overfit (~40 s), the merged-LoRA engine tests (~2 min)
	$(PY) -m pytest -m slow

test-fast: install   # unit tests only, no services
	$(PY) -m pytest -m "not integration"

# The first run on a GPU machine (bench/gpu_check.py): the CUDA tests, the paper-size model trained for a few dozen
# steps through the training job (DDP; FSDP over NCCL with 2+ GPUs), then served: one table, gpu_check.json.
# Without a GPU the same steps run at tiny size.
gpu-check: install
	$(PY) -m infra.stack up --services ray,mlflow
	eval "$$($(PY) -m infra.stack env)" && $(PY) -m bench.gpu_check; rc=$$?; $(PY) -m infra.stack down; exit $$rc

# The ablation miniature (docs/ablation.md): paper Table 4 on CPU, about two hours per seed on an idle 2-core
# machine. The pipeline runs as a Ray job on the local stack, which stays up afterwards for the MLflow UI
# (`make stack-down` stops it).
# SEED="0 1" runs two seeds one after the other; ABLATION=jobs/ablations/table4_quick.yaml is CI's short version.
SEED ?= 0
ABLATION ?= jobs/ablations/table4_mini.yaml
ablation: install
	$(PY) -m infra.stack up --services ray,mlflow
	eval "$$($(PY) -m infra.stack env)" && .venv/bin/ray job submit --working-dir . -- python -m jobs.ablation \
	  --config $(ABLATION) --seed $(SEED) --root $(CURDIR)/.stack/ablation --out $(CURDIR)/docs/ablation \
	  --tracking-uri $$MLFLOW_TRACKING_URI

stack-up: install
	$(PY) -m infra.stack up

stack-down:
	$(PY) -m infra.stack down

clean:
	rm -rf .venv .stack .pytest_cache
