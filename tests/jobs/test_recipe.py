"""Recipes are validated in full before any worker starts; shipped recipes parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_ops.schema import conversation_to_cut
from data_ops.shards import ShardWriter
from jobs.recipe import RecipeError, load_recipe, parse_recipe
from jobs.training.plan import resolve
from jobs.training.preflight import check_data
from models.conversation import AudioPart, Conversation, TextPart, Turn

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "jobs" / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_parse(path):
    recipe = load_recipe(path)
    assert abs(sum(recipe.data.ratios.values()) - 1) < 1e-6
    cfg = recipe.model.speechlm_config()
    if path.stem.startswith("b2"):
        assert cfg.lm.mode == "frozen"
    if path.stem.startswith(("b1", "b2", "b3", "speechcombine")):
        assert "text" not in recipe.data.sources
    if path.stem == "speechcombine_pretrain":
        assert set(recipe.data.sources) == {"asr_ast"}
    if path.stem == "b3_two_stage":
        assert [(s.name, s.lm_mode) for s in recipe.stage_list()] == [("frozen-lm", "frozen"), ("lora", "lora")]
    if path.stem == "vtblender_3b":
        assert recipe.data.sources["text"].batch_size == 1 and recipe.data.sources["asr_ast"].batch_size == 4
        assert (recipe.train.lr, recipe.train.weight_decay, recipe.train.warmup_steps, recipe.train.max_steps) == \
            (1e-4, 1e-3, 2500, 100000)
        assert cfg.lm.lora.r == 32


def _base(uri="/nonexistent"):
    return {"run": {"name": "t"}, "model": {"size": "tiny"},
            "data": {"sources": {"text": {"uris": [uri], "ratio": 0.5, "batch_size": 1},
                                 "asr_ast": {"uris": [uri], "ratio": 0.5, "batch_size": 2}}},
            "train": {"max_steps": 3}}


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r["train"].update(learning_rate=1), r"train.learning_rate: unknown key"),
    (lambda r: r.update(extra={}), r"extra: unknown key"),
    (lambda r: r["data"]["sources"]["text"].update(ratio=0.4), r"ratios must sum to 1, they sum to 0.900000"),
    (lambda r: r["data"]["sources"].update(speech={"uris": ["x"], "ratio": 0.0, "batch_size": 1}),
     r"unknown data type\(s\) \['speech'\]"),
    (lambda r: r["model"].update(lm_mode="partial"), r"model.lm_mode"),
    (lambda r: r["train"].update(max_steps=0), r"train.max_steps"),
    (lambda r: r.update(promote={"enabled": True}, stages=[
        {"name": "text-only", "max_steps": 3, "ratios": {"text": 1.0, "asr_ast": 0.0}}]),
     r"promote.enabled: true, but no stage samples a speech type"),
    (lambda r: r.update(stages=[{"name": "s", "max_steps": 3, "batch_sizes": {"sqa": 4}}]),
     r"stage s: batch_sizes must be >= 1 and name types with sources"),
    (lambda r: r["train"].update(fsdp_shard_size=2, num_workers=4), r"fsdp_shard_size=2 needs strategy: fsdp"),
    (lambda r: r["train"].update(fsdp_shard_size=4, num_workers=6, strategy="fsdp"),
     r"fsdp_shard_size=4 must divide num_workers=6"),
    (lambda r: r["data"]["sources"]["text"].update(max_batch_audio_s=10.0),
     r"data.sources.text: max_batch_audio_s is a budget of audio seconds and text has none"),
    (lambda r: r["data"]["sources"]["asr_ast"].update(max_batch_tokens=0), r"max_batch_tokens"),
    (lambda r: r.update(train={"max_steps": 6, "final_checkpoint": False}, stages=[
        {"name": "a", "max_steps": 3}, {"name": "b", "max_steps": 3}]),
     r"train.final_checkpoint: false, but the recipe has stages"),
])
def test_invalid_recipes_name_the_problem(mutate, message):
    r = _base()
    mutate(r)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(r)


def test_budgets_count_in_the_fingerprint_only_when_set():
    """Runs checkpointed before budgets existed resume (their fingerprint is the same); a budget changes it."""
    plain = parse_recipe(_base())
    raw = plain.model_dump(mode="json", exclude={"run": True, "promote": True, "data": {"endpoint_url"},
                                                 "train": {"activation_checkpointing"}})
    assert raw["data"]["sources"]["asr_ast"]["max_batch_audio_s"] is None  # dumped, popped by the fingerprint
    budgeted = _base()
    budgeted["data"]["sources"]["asr_ast"]["max_batch_audio_s"] = 60.0
    assert parse_recipe(budgeted).training_fingerprint() != plain.training_fingerprint()
    assert plain.training_fingerprint() == parse_recipe(_base()).training_fingerprint()


def test_skipping_the_last_checkpoint_is_not_part_of_what_the_weights_depend_on():
    # a speed check (bench.gpu_check) turns it off; a run resumed with it on or off is the same training
    speed = _base()
    speed["train"]["final_checkpoint"] = False
    assert parse_recipe(speed).training_fingerprint() == parse_recipe(_base()).training_fingerprint()


def _corpus(root, pcm_audio, types=("text", "asr_ast")):
    with ShardWriter(str(root), shard_size=2, progress=False) as w:
        if "text" in types:
            w.write("text", [conversation_to_cut(Conversation([Turn.text("user", "q"), Turn.text("assistant", "a")]),
                                                 cut_id=f"t{i}", data_type="text", task="text", langs=["en"])
                             for i in range(3)])
        if "asr_ast" in types:
            w.write("asr_ast", [conversation_to_cut(
                Conversation([Turn("user", [AudioPart(pcm_audio(0.2, i)), TextPart("T.")]), Turn.text("assistant", "a")]),
                cut_id=f"a{i}", data_type="asr_ast", task="asr", langs=["en"]) for i in range(3)])


def test_data_checks_missing_shard_and_empty_type(tmp_path, pcm_audio):
    _corpus(tmp_path / "c", pcm_audio)
    summary = check_data(resolve(parse_recipe(_base(str(tmp_path / "c"))))).summary
    assert summary["asr_ast"]["cuts"] == 3 and summary["text"]["shards"] == 2
    (tmp_path / "c" / "asr_ast" / "recording.000001.tar").unlink()
    with pytest.raises(RecipeError, match=r"asr_ast/recording.000001.tar is listed in the manifest but missing"):
        check_data(resolve(parse_recipe(_base(str(tmp_path / "c")))))
    _corpus(tmp_path / "only_text", pcm_audio, types=("text",))
    with pytest.raises(RecipeError, match=r"only_text has no 'asr_ast' shards"):
        check_data(resolve(parse_recipe(_base(str(tmp_path / "only_text")))))
    with pytest.raises(RecipeError, match=r"manifest.json not found"):
        check_data(resolve(parse_recipe(_base(str(tmp_path / "nothing")))))


def test_bad_recipe_fails_before_any_worker_with_one_message(tmp_path):
    r = _base()
    r["train"]["lr"] = -1
    r["model"]["colour"] = "blue"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(r))
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {path} is not a valid recipe:")
    assert "model.colour: unknown key" in proc.stderr and "train.lr: Input should be greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--config", str(tmp_path / "nope.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
