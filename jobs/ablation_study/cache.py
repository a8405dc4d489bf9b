"""The step cache of one seed's run: which steps are done (`SeedState`, `--root/state-seed<seed>.json`), from
which inputs (a fingerprint of `step_inputs` / `recipe_inputs`), so a rerun skips what is done and does again a
step whose inputs changed (an edited config or recipe, an upstream step done again). It only records; what a step
does is `pipeline.py`'s."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from jobs.recipe import Recipe


class SeedState:
    """What one seed's run has done so far (`state-seed<N>.json` under the work folder): steps finished, their
    outputs and timings, so a rerun skips them."""

    def __init__(self, path: Path):
        self.path = path
        self.state = json.loads(path.read_text()) if path.is_file() else {}
        self.timings = self.state.get("timings", {})

    def __getitem__(self, key: str):
        return self.state[key]

    def get(self, key: str, default=None):
        return self.state.get(key, default)

    def done(self, key: str, value) -> None:
        self.state[key] = value
        self.path.write_text(json.dumps(self.state, indent=1))

    def current(self, path: str, inputs) -> bool:
        """Is the step at `path` ("encoder", "models/joint": a key, or group/key) done from these `inputs` (its
        recipe or settings and what it was built from)? Done from other inputs (a config edited since, an upstream
        step redone), it is not: the step runs again and `record` replaces its output. Only answers; writes nothing."""
        group, _, key = path.partition("/")
        done = key in self.state.get(group, {}) if key else group in self.state
        if not done:
            return False
        if self.state.get("inputs", {}).get(path) != _fingerprint(inputs):
            print(f"[ablation] {path} was done from other inputs than the config's now: doing it again", flush=True)
            return False
        return True

    def record(self, path: str, value, inputs) -> None:
        """The step at `path` done from `inputs` (see `current`), with its output `value`."""
        group, _, key = path.partition("/")
        self.state.setdefault("inputs", {})[path] = _fingerprint(inputs)
        self.done(group, {**self.state.get(group, {}), key: value} if key else value)

    def timed(self, key: str, fn):
        """Run `fn`, record how long it took (only work that runs: a step found done keeps its first timing)."""
        start = time.time()
        value = fn()
        self.timings[key] = round(time.time() - start, 1)
        self.state["timings"] = self.timings
        return value


def _fingerprint(inputs) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def step_inputs(settings: dict, root: Path, *upstream) -> dict:
    """What a step's output depends on: its settings (paths under the work folder relative to it, so a moved
    folder is the same) and the outputs it starts from."""
    return {"settings": json.loads(json.dumps(settings).replace(str(root), "<root>")), "from": list(upstream)}


def recipe_inputs(recipe: Recipe, root: Path, *upstream) -> dict:
    settings = recipe.model_dump(mode="json")
    settings["run"] = {"seed": settings["run"]["seed"]}  # run names, storage and tracking do not change what trains
    return step_inputs(settings, root, *upstream)
