"""The ablation pipeline's parts: how it adapts the shipped recipes, its configs, and the paper's claims checked
on metrics (the whole pipeline runs in test_ablation_job.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.ablation_study.cache import SeedState
from jobs.ablation_study.claims import check_claims
from jobs.ablation_study.config import adapt_recipe, load_config
from jobs.ablation_study.report import seeds_table
from jobs.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_adapt_recipe_changes_only_corpus_seed_steps_and_checkpoints(tmp_path):
    src = "jobs/recipes/mini/b3_two_stage.yaml"
    r = adapt_recipe(src, run_name="abl-b3-s1", experiment="abl", seed=1, corpus="/data/corpus",
                     runs_dir=str(tmp_path), tracking_uri="http://127.0.0.1:5000", steps=100,
                     lm_pretrained="/ckpt/text-lm", encoder_pretrained="/ckpt/encoder")
    shipped = load_recipe(ROOT / src)
    assert (r.run.name, r.run.seed, r.run.experiment) == ("abl-b3-s1", 1, "abl")
    assert all(s.uris == ["/data/corpus"] for s in r.data.sources.values())
    assert (r.model.lm_pretrained, r.model.encoder_pretrained) == ("/ckpt/text-lm", "/ckpt/encoder")
    # stages keep the shipped proportions (the paper's 100k frozen + 15k LoRA) and sum to the steps asked
    assert [s.max_steps for s in r.stage_list()] == [87, 13] and r.train.max_steps == 100
    assert [s.lm_mode for s in r.stage_list()] == [s.lm_mode for s in shipped.stage_list()]
    assert r.data.ratios == shipped.data.ratios and r.train.lr == shipped.train.lr
    assert {t: s.batch_size for t, s in r.data.sources.items()} == \
        {t: s.batch_size for t, s in shipped.data.sources.items()}
    assert r.model.speechlm_config().lm.pretrained == "/ckpt/text-lm"
    assert r.model.speechlm_config().encoder.pretrained == "/ckpt/encoder"


def test_shipped_ablation_configs_load():
    full = load_config(ROOT / "jobs/ablations/table4_mini.yaml")
    quick = load_config(ROOT / "jobs/ablations/table4_quick.yaml")
    assert list(full.recipes) == ["joint", "b1-speech-only", "b2-frozen-lm", "b3-two-stage", "speechcombine"]
    assert set(quick.recipes) <= set(full.recipes) and quick.speech_steps < full.speech_steps
    recipes = {label: load_recipe(ROOT / path) for label, path in full.recipes.items()}
    assert recipes["b2-frozen-lm"].model.lm_mode == "frozen" and recipes["joint"].model.lm_mode == "lora"
    assert "text" in recipes["joint"].data.sources
    assert all("text" not in recipes[k].data.sources for k in ("b1-speech-only", "b2-frozen-lm", "b3-two-stage"))
    assert set(recipes["speechcombine"].data.sources) == {"asr_ast"}
    assert load_recipe(ROOT / full.text_lm).data.ratios == {"text": 1.0}


def test_a_role_naming_no_recipe_is_refused(tmp_path):
    """A recipe key renamed in the YAML must not turn its checks into "not measured" unnoticed."""
    bad = tmp_path / "renamed.yaml"
    bad.write_text((ROOT / "jobs/ablations/table4_quick.yaml").read_text().replace(
        "  b1-speech-only: jobs/recipes/mini/b1_speech_only.yaml", "  b1: jobs/recipes/mini/b1_speech_only.yaml"))
    with pytest.raises(RecipeError, match="roles .'speech_only': 'b1-speech-only'. name no recipe"):
        load_config(bad)


def test_a_recipe_labelled_like_the_text_lm_row_is_refused(tmp_path):
    """The text LM's row is "text-lm"; a recipe under that label would be listed twice in the comparison table (once
    in result.json, a dict), trained under the text LM's run name and state key, and replace it."""
    bad = tmp_path / "collides.yaml"
    bad.write_text("name: x\nexperiment: y\ntext_lm: jobs/recipes/mini/text_lm.yaml\nspeech_steps: 5\n"
                   "recipes: {text-lm: jobs/recipes/mini/joint.yaml}\nroles: {joint: text-lm}\nsuite: s\n"
                   "metrics: [asr/wer]\n")
    with pytest.raises(RecipeError, match="recipe label 'text-lm' is the text LM's row"):
        load_config(bad)


def test_bad_ablation_config_names_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nexperiment: y\ntext_lm: jobs/recipes/mini/text_lm.yaml\nspeech_steps: 0\n"
                   "recipes: {joint: jobs/recipes/mini/nope.yaml}\nsuite: s\nmetrics: [asr/wer]\n")
    with pytest.raises(RecipeError, match="speech_steps"):
        load_config(bad)
    bad.write_text(bad.read_text().replace("speech_steps: 0", "speech_steps: 5"))
    with pytest.raises(RecipeError, match="nope.yaml does not exist"):
        load_config(bad)


ROLES = {"joint": "joint", "speech_only": "b1-speech-only", "frozen_lm": "b2-frozen-lm"}


def test_claims_are_checked_on_the_numbers_not_assumed():
    def rows(text, wer, gap):  # per model: text exact match, ASR WER (None: not measured), content gap
        labels = ["text-lm", "joint", "b1-speech-only", "b2-frozen-lm"]
        out = {}
        for label, t, w, g in zip(labels, text, wer, gap):
            out[label] = {"eval/s/text/exact_match": t, "eval/s/speech/content_gap": g}
            if w is not None:
                out[label]["eval/s/asr/wer"] = w
        return out

    paper = {c["claim"].split(":")[0]: c["holds"] for c in check_claims(
        rows(text=(0.8, 0.75, 0.1, 0.8), wer=(1.0, 0.3, 0.28, 0.9), gap=(0.01, 1.2, 1.0, 0.6)), "s", ROLES)}
    for claim in ("joint SFT transcribes held-out voices", "joint SFT's speech comes from the audio",
                  "joint SFT reaches speech quality close to B1", "B2 (frozen LM) is worse on speech",
                  "joint SFT keeps text accuracy", "B1 (speech-only SFT) forgets text",
                  "every speech recipe reads the audio", "the text LM (never trained on audio) has no content gap"):
        assert paper[claim] is True, claim
    for claim in ("joint SFT translates close to B1", "joint SFT follows spoken instructions better than B1",
                  "joint SFT follows spoken instructions"):
        assert paper[claim] is None, claim  # not measured here: reported as such, never assumed
    flipped = {c["claim"].split(":")[0]: c["holds"] for c in check_claims(
        rows(text=(0.8, 0.2, 0.9, 0.8), wer=(0.9, 0.9, 0.3, 0.5), gap=(0.5, 0.0, 1.0, 0.6)), "s", ROLES)}
    assert not any(v for v in flipped.values() if v is not None), flipped
    # the checks follow the labels the config gives each role, whatever they are called
    renamed = {{"joint": "mine", "b1-speech-only": "asr-only", "b2-frozen-lm": "frozen"}.get(k, k): v for k, v in
               rows(text=(0.8, 0.75, 0.1, 0.8), wer=(1.0, 0.3, 0.28, 0.9), gap=(0.01, 1.2, 1.0, 0.6)).items()}
    again = {c["claim"].split(":")[0]: c["holds"] for c in check_claims(
        renamed, "s", {"joint": "mine", "speech_only": "asr-only", "frozen_lm": "frozen"})}
    assert again == paper


def test_spoken_instruction_checks_say_whether_their_samples_can_tell():
    def checks(joint, b1):  # per model: the ids of the spoken instructions it got right, out of 100
        ids = [f"spoken-{i:03d}" for i in range(100)]
        spoken = {label: {i: i in right for i in ids} for label, right in (("joint", joint), ("b1-speech-only", b1))}
        rows = {label: {"eval/s/spoken_instruction/exact_match": sum(v.values()) / 100} for label, v in spoken.items()}
        found = {c["claim"].split(":")[0]: c for c in check_claims(rows, "s", ROLES, spoken)}
        return found["joint SFT follows spoken instructions better than B1"], found[
            "joint SFT follows spoken instructions"]

    ids = [f"spoken-{i:03d}" for i in range(100)]
    # 0.10 vs 0.13, 7 right by both: B1 ahead by 3 samples, which these 100 cannot tell from the draw
    better, floor = checks(set(ids[:10]), set(ids[:7] + ids[10:16]))
    assert better["holds"] is False and better["within_noise"] is True and better["ci95"][0] < 0 < better["ci95"][1]
    assert floor["holds"] is True and floor["within_noise"] is True  # 0.10 against a floor of 0.1
    # 0.40 vs 0.10: both settled
    better, floor = checks(set(ids[:40]), set(ids[:10]))
    assert better["holds"] is True and better["within_noise"] is False and better["ci95"][0] > 0
    assert floor["holds"] is True and floor["within_noise"] is False and floor["ci95"][0] > 0.1
    # without per-sample scores (or not on the same samples) no interval is claimed
    rows = {"joint": {"eval/s/spoken_instruction/exact_match": 0.4}, "b1-speech-only":
            {"eval/s/spoken_instruction/exact_match": 0.1}}
    mismatched = {"joint": {"a": True}, "b1-speech-only": {"b": False}}
    for spoken in (None, mismatched):
        found = {c["claim"].split(":")[0]: c for c in check_claims(rows, "s", ROLES, spoken)}
        assert found["joint SFT follows spoken instructions better than B1"]["holds"] is True
        assert "ci95" not in found["joint SFT follows spoken instructions better than B1"]


def test_seeds_table_puts_each_seeds_numbers_and_checks_side_by_side(tmp_path):
    import json

    ids = [f"spoken-{i:03d}" for i in range(100)]
    for seed, joint_right in ((0, 7), (1, 40)):
        spoken = {"joint": {i: n < joint_right for n, i in enumerate(ids)},
                  "b1-speech-only": {i: n < 10 for n, i in enumerate(ids)}}
        metrics = {label: {"eval/s/spoken_instruction/exact_match": sum(v.values()) / 100, "eval/s/text/samples": 9.0,
                           "eval/s/speech/content_gap": 0.05} for label, v in spoken.items()}
        (tmp_path / f"seed-{seed}").mkdir()
        (tmp_path / f"seed-{seed}" / "result.json").write_text(json.dumps(
            {"seed": seed, "models": {"joint": "m1", "b1-speech-only": "m2"}, "metrics": metrics,
             "claims": check_claims(metrics, "s", ROLES, spoken)}))
    lines = seeds_table(tmp_path).splitlines()
    assert "| joint | spoken_instruction/exact_match | 0.070 | 0.400 | 0.330 |" in lines
    assert not any("samples" in line for line in lines)  # counts are not scores
    better = next(line for line in lines if line.startswith("| joint SFT follows spoken instructions better"))
    cells = [c.strip() for c in better.strip("|").split("|")]
    assert len(cells) == 3 and cells[1].startswith("no (95% CI") and cells[1].endswith("within noise)")
    assert cells[2].startswith("holds (95% CI") and "within noise" not in cells[2]
    gap = next(line for line in lines if "no content gap" in line)  # its "|gap|" must not split the row
    assert len(gap.strip("|").split("|")) == 3
    assert (tmp_path / "seeds.md").read_text().splitlines() == lines


def test_comparison_table_marks_the_best_of_each_column_by_its_direction():
    from jobs.evaluation.compare import comparison_table

    rows = [("a", {"eval/s/asr/wer": 0.3, "eval/s/text/answer_loss": 0.7, "eval/s/text/exact_match": 0.5}),
            ("b", {"eval/s/asr/wer": 0.5, "eval/s/text/answer_loss": 0.6, "eval/s/text/exact_match": 0.4})]
    head, _, a, b = comparison_table(rows, ["eval/s/asr/wer", "eval/s/text/answer_loss",
                                            "eval/s/text/exact_match"]).splitlines()
    assert head == "| model | asr/wer ↓ | text/answer_loss ↓ | text/exact_match ↑ |"
    assert a == "| a | **0.300** | 0.700 | **0.500** |", a  # lower WER and loss are better, higher match
    assert b == "| b | 0.500 | **0.600** | 0.400 |", b


def test_a_step_done_from_other_inputs_is_done_again_not_reported_as_the_new_configs(tmp_path):
    path = tmp_path / "state-seed0.json"
    state = SeedState(path)
    assert not state.current("models/joint", {"steps": 2000})  # never done
    state.record("models/joint", "models:/mini-joint/1", {"steps": 2000})
    state.record("encoder", {"wer": 0.1}, {"steps": 800})

    again = SeedState(path)  # the same command again: done, skipped
    assert again.current("models/joint", {"steps": 2000}) and again.current("encoder", {"steps": 800})
    before = path.read_text()
    assert not again.current("models/joint", {"steps": 5000})  # the config asks for more steps now
    assert not again.current("encoder", {"steps": 1600})
    assert path.read_text() == before  # asking writes nothing
    # a crash before the step is done again does not bring the old output back as the new config's
    assert not SeedState(path).current("encoder", {"steps": 1600})
    again.record("encoder", {"wer": 0.2}, {"steps": 1600})
    assert SeedState(path).current("encoder", {"steps": 1600}) and SeedState(path)["encoder"] == {"wer": 0.2}
