"""Evaluation suites: the shipped ones load; a bad one is refused naming the problem, before any Ray work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from jobs.config_files import ConfigError
from jobs.evaluation.suite import load_suite

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "jobs/suites").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_suites_load(path):
    suite = load_suite(str(path))
    assert suite.tasks and len({t.name for t in suite.tasks}) == len(suite.tasks)


@pytest.mark.parametrize("tasks, message", [
    ([{"name": "asr", "kind": "asr", "data_type": "asr_ast"}, {"name": "asr", "kind": "text", "data_type": "text"}],
     "task names must be unique; repeated: ['asr']"),
    ([{"name": "asr", "kind": "asr", "data_type": "speech"}], "tasks.0.data_type"),
    ([{"name": "asr", "kind": "asr", "data_type": "asr_ast", "limt": 3}], "tasks.0.limt"),
    ([{"name": "heard", "kind": "spoken_instruction", "data_type": "mixed_modal", "prompt": "transcribe"}],
     "task 'heard': prompt transcribe is scored as ASR; give it kind asr"),
])
def test_bad_suites_are_refused_by_name(tmp_path, tasks, message):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "uris": ["x"], "tasks": tasks}))
    with pytest.raises(ConfigError) as e:  # library code raises; only the entrypoint exits
        load_suite(str(path))
    assert f"{path} is not a valid evaluation suite" in str(e.value) and message in str(e.value)


def test_a_transcribe_task_asks_for_the_audio_as_training_asr_does_and_scores_against_what_it_says():
    import numpy as np

    from data_ops.importers import asr_conversation
    from jobs.evaluation.run import score, transcription_request
    from jobs.evaluation.suite import EvalTask, Suite
    from models.conversation import AudioPart, Conversation, Turn

    tone = np.zeros(1600, np.float32)
    spoken = Conversation([Turn("user", [AudioPart(tone, transcript="What is 2 plus 3? "),
                                         AudioPart(tone, transcript="Answer fast.")]),
                           Turn.text("assistant", "2 plus 3 is 5.")])
    request, said = transcription_request(spoken, "de")
    assert said == "What is 2 plus 3? Answer fast."
    training = asr_conversation(tone, said, "de")  # the request is laid out as the training ASR conversations
    assert [type(p) for p in request.turns[0].parts] == [AudioPart, AudioPart, type(training.turns[0].parts[1])]
    assert request.turns[0].parts[-1] == training.turns[0].parts[1] and len(request.turns) == 1
    assert transcription_request(Conversation([Turn("user", [AudioPart(tone)]), Turn.text("assistant", "x")]),
                                 "en")[1] == ""  # no transcript: nothing to score against

    task = EvalTask(name="heard", kind="asr", data_type="mixed_modal", prompt="transcribe")
    suite = Suite(name="s", tasks=[task])
    rows = [{"reference": "what is two", "prediction": "what is two", "langs": '["en"]'},
            {"reference": "", "prediction": "anything", "langs": '["en"]'}]
    metrics = score(suite, task, [{**r, "loss_sum": 1.0, "loss_tokens": 1} for r in rows])
    assert metrics["wer"] == 0.0 and metrics["no_reference"] == 1 and metrics["samples"] == 2
