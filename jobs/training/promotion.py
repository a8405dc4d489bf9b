"""The promotion gate: after the last step, is this model fit to take the registry alias that serving follows?

Two measures on held-out samples (`promote.eval_uris`, else the run's own corpora), each against a threshold in the
recipe's `promote:` section:

- **content gap** (`models.content_check`): how much the right audio lowers the answers' loss against another
  utterance of the same length. A model whose audio path collapsed still trains and still answers; only this shows
  that it answers the same whatever is said.
- **text retention**: the answer loss on text-only conversations, against the LM the run started from (the model
  at the start of the first stage that samples speech: `lm_pretrained`, or the previous stage's weights). Speech
  SFT that makes the LM forget its text skills is the most common failure of audio LLM fine-tuning.

The measures run as one Ray task with a training worker's resources (a GPU when the recipe trains on GPUs), after
the workers are gone; `decide` turns them into a `Verdict` that knows nothing of Ray or MLflow.
"""

from __future__ import annotations

import dataclasses
import math

GATE_TAG = "vtb.gate"  # passed | failed | off


@dataclasses.dataclass(frozen=True)
class Gate:
    name: str
    value: float | None
    """None: not measured (`detail` says why)."""
    threshold: float
    passed: bool | None
    """None: does not apply to this run (e.g. retention when the run started from a random init)."""
    detail: str


@dataclasses.dataclass(frozen=True)
class Verdict:
    gates: tuple[Gate, ...]
    eval_set: str
    enabled: bool = True
    error: str | None = None
    """The measurement itself failed (a corpus that cannot be read, out of memory): not promoted, and said why."""

    @property
    def passed(self) -> bool:
        return not self.enabled or (self.error is None and all(g.passed is not False for g in self.gates))

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if g.passed is False]

    def summary(self) -> str:
        if not self.enabled:
            return "off (a text-only recipe: no audio path to check, no starting LM to compare with)"
        if self.error:
            return f"ERROR, not measured: {self.error}"
        word = "passed" if self.passed else "FAILED"
        return f"{word}: " + "; ".join(g.detail for g in self.gates) + f" (on {self.eval_set})"

    def tags(self) -> dict[str, str]:
        """For the run and the model version: the verdict, each gate's number and threshold, which failed."""
        if not self.enabled:
            return {GATE_TAG: "off"}
        if self.error:
            return {GATE_TAG: "error", f"{GATE_TAG}.error": self.error[:5000]}
        tags = {GATE_TAG: "passed" if self.passed else "failed", f"{GATE_TAG}.eval_set": self.eval_set}
        for g in self.gates:
            tags[f"{GATE_TAG}.{g.name}"] = g.detail
        if self.failed:
            tags[f"{GATE_TAG}.failed"] = ",".join(g.name for g in self.failed)
        return tags


def decide(measures: dict, settings) -> Verdict:
    """`measures` from `measure` -> the verdict under `settings` (the recipe's `PromoteSection`)."""
    gap = measures.get("content_gap")
    content = Gate("content_gap", gap, settings.min_content_gap,
                   None if gap is None else gap >= settings.min_content_gap,
                   f"content gap {gap:.3f} nats/token (at least {settings.min_content_gap})" if gap is not None
                   else f"content gap not measured: {measures.get('content_gap_why')}")
    if gap is None:  # no speech samples: the gate cannot say the audio path works
        content = dataclasses.replace(content, passed=False)
    start, final = measures.get("text_loss_start"), measures.get("text_loss_final")
    limit = settings.max_text_loss_increase
    if start is not None and final is not None:
        rise = final / start - 1.0 if start > 0 else math.inf
        retention = Gate("text_retention", rise, limit, rise <= limit,
                         f"text answer loss {final:.3f} vs {start:.3f} for the starting LM ({rise:+.1%}, at most "
                         f"{limit:+.0%})")
    else:
        why = measures.get("text_loss_why", "not measured")
        # nothing to retain from a random init; without text samples the gate cannot say nothing was forgotten
        retention = Gate("text_retention", None, limit, None if measures.get("random_start") else False,
                         f"text retention {why}")
    return Verdict((content, retention), measures.get("eval_set", "?"))


def _starting_model(plan, tokenizer_files: dict | None, start_from, device: str):
    """The model at the start of the first speech stage, in eval mode (LoRA freshly initialised adds nothing)."""
    from pathlib import Path

    from jobs.training.checkpoint import load_initial_weights
    from jobs.training.sft import build_model

    model = build_model(plan, plan.stages[plan.first_speech_stage], tokenizer_files, device)
    if start_from is not None:
        with start_from.as_directory() as path:
            load_initial_weights(model, Path(path))
    return model.eval()


def measure(plan, tokenizer_files: dict | None, model_uri: str, tracking_uri: str, start_from=None) -> dict:
    """The gate's numbers for the model at `model_uri` (what gets registered); `start_from`: the checkpoint the
    first speech stage started from (None: the recipe's `lm_pretrained`, or a random init without one)."""
    import torch

    from jobs.common.content import first_conversations
    from models.content_check import answer_loss, content_gap
    from models.precision import resolve_device
    from tracking.models import load_speechlm

    settings, endpoint = plan.promote, plan.data.endpoint_url
    uris = settings.eval_uris or plan.corpus_uris
    out: dict = {"eval_set": ", ".join(uris) + ("" if settings.eval_uris else " (the training corpora)")}
    speech = first_conversations(uris, "asr_ast", settings.speech_samples, endpoint, plan.manifests)
    text = first_conversations(uris, "text", settings.text_samples, endpoint, plan.manifests)
    random_start = start_from is None and not plan.model.lm.pretrained
    with torch.no_grad():
        # the trained PyTorch model in fp32, like the starting model (built as training builds it): the retention
        # compares weights, not engines or dtypes (the served engine is tested equal to this model)
        model = load_speechlm(model_uri, tracking_uri=tracking_uri, device=str(resolve_device("auto")))
        if len(speech) >= 2:
            out["content_gap"] = content_gap(model, speech).gap
        else:
            out["content_gap_why"] = f"fewer than 2 asr_ast samples in {out['eval_set']}"
        if text and not random_start:
            out["text_loss_final"] = answer_loss(model.eval(), text)
            del model
            out["text_loss_start"] = answer_loss(
                _starting_model(plan, tokenizer_files, start_from, resolve_device("auto")), text)
        elif random_start:
            out.update(random_start=True, text_loss_why="does not apply: the run started from a random-init LM")
        else:
            out["text_loss_why"] = (f"not measured: no text samples in {out['eval_set']} (name a corpus with text in "
                                    "promote.eval_uris)")
    return out
