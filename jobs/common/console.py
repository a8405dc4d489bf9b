"""A job log a person can read: each line once, no terminal escape codes in files, no known library noise.

Called by the entrypoints at start and by the Ray Train workers. It only silences what is known to be noise here,
each item with its reason; anything else a library says still shows.
"""

from __future__ import annotations

import logging
import sys
import warnings

# (message regex, category, why it is noise here)
KNOWN_WARNINGS = [
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning,
     "raised inside transformers when PEFT wraps a model; nothing in this project calls it"),
]


def quiet_console(env: dict) -> None:
    """Filter known-noise warnings, turn off per-file progress bars (transformers' weight loading, MLflow's
    artifact downloads: dozens of bars a second in a job log), and Ray's coloured worker prefixes when the output
    is not a terminal. `env`: the process environment the settings go into (the entrypoint's `os.environ`)."""
    for message, category, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not sys.stdout.isatty():
        env.setdefault("RAY_COLOR_PREFIX", "0")  # Ray colours "(pid=...)" prefixes with ANSI codes otherwise
    # `ray job submit --working-dir .` leaves .git and .venv out by default (what we want) and warns each time
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
    # "Waiting up to 300 seconds for model version to finish creation" at every registration
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # a process without transformers (the data jobs' driver) has no bars of its own
        pass


def quiet_ray_data() -> None:
    """For drivers whose Ray Data runs are many and short (evaluation tasks, the ablation's steps): no per-dataset
    progress blocks in the log; each step prints its own one-line result instead."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


# What Ray Train workers need in their environment before they start (the rest `quiet_console` sets in the worker):
# Train V2 patches `print` to also log to its own files, and when anything has wrapped sys.stdout (MLflow's system
# metrics monitor does) the patched print writes the line twice to the worker's stdout.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
