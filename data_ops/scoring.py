"""Scores as the paper computes them (section 4.1, Table 2, Appendix B).

- ASR: WER (jiwer) after Whisper's normalizers: `EnglishTextNormalizer` for English, `BasicTextNormalizer` for the
  other languages (transformers' copies of OpenAI's code), corpus-level (total edits / total reference words).
- AST: corpus BLEU with sacrebleu's defaults (13a tokenization).
- Text tasks: exact match after the basic normalizer (case, punctuation and spacing do not count).
- Speech QA and spoken instructions: an LLM judge through any OpenAI-compatible endpoint with the paper's
  Appendix B rubric; the correctness score (0 or 1) is averaged. A judge answer without a readable 0/1 score
  leaves the sample *unscored* (counted, never turned into 0 or 1); without a judge every such sample is unscored.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jiwer
import numpy as np
import sacrebleu

from data_ops.llm_client import ChatClient, ChatEndpoint, EndpointError

JUDGE_SYSTEM = (
    "You are an expert evaluator of question-answering performance.\n\n"
    "Your task is to evaluate the \"correctness\" and \"redundancy\" of an AI assistant's response to a user question "
    "based on the provided context.\n\n"
    "Provide your output following the schema provided.\n\n"
    "Here is a description of the required fields:\n\n"
    "- correctness_score: either 0 or 1\n"
    "- Score 0: The AI assistant's answer is incorrect based on the provided context, or the AI assistant's answer "
    "simply copies the context.\n"
    "- Score 1: The AI assistant's answer is correct based on the provided context, and it does not simply copy the "
    "context.\n"
    "- correctness_explanation: explanation of your score for \"correctness\".\n"
    "- redundancy_score: an integer score between 1 and 10, where a higher score indicates that the AI assistant's "
    "answer copies more redundant information from the context.\n"
    "- redundancy_explanation: explanation of your score for \"redundancy\".\n\n"
    "Answer with one JSON object with exactly these four fields."
)
JUDGE_INPUT = ("[Question]\n{question}\n[Context]\n{context}\n[Start of Reference Answer]\n{reference}\n"
               "[End of Reference Answer]\n[Start of Assistant's Answer]\n{answer}\n[End of Assistant's Answer]")


def normalizer(lang: str):
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    return EnglishTextNormalizer({}) if lang == "en" else BasicTextNormalizer()


def wer(references: list[str], hypotheses: list[str], lang: str) -> float:
    """Corpus WER in [0, inf) after Whisper normalization; references that normalize to nothing are dropped."""
    norm = normalizer(lang)
    pairs = [(norm(r), norm(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        raise ValueError("no reference with words to score")
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    errors = out.substitutions + out.deletions + out.insertions
    return errors / sum(len(r.split()) for r, _ in pairs)


def bleu(references: list[str], hypotheses: list[str]) -> float:
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def exact_matches(references: list[str], hypotheses: list[str]) -> list[bool]:
    """Per sample: does the hypothesis equal the reference after the basic normalizer."""
    norm = normalizer("other")
    return [norm(r).strip() == norm(h).strip() for r, h in zip(references, hypotheses)]


def exact_match(references: list[str], hypotheses: list[str]) -> float:
    return sum(exact_matches(references, hypotheses)) / max(1, len(references))


def bootstrap_ci(scores: list[float], baseline: list[float] | None = None, *, level: float = 0.95,
                 resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of mean(scores), or with `baseline` (another model's scores on the
    same samples, in the same order) of mean(scores) - mean(baseline). Paired: a resample draws a sample's two
    scores together, so what both models get right or wrong cancels (Koehn 2004's paired bootstrap). This is what
    says whether a difference of a few samples out of 100 is a difference between the models or the draw."""
    diffs = np.asarray(scores, dtype=float)
    if baseline is not None:
        if len(baseline) != len(diffs):
            raise ValueError(f"paired scores need the same samples: {len(diffs)} vs {len(baseline)}")
        diffs = diffs - np.asarray(baseline, dtype=float)
    if not len(diffs):
        raise ValueError("no samples to bootstrap")
    draws = np.random.default_rng(seed).integers(0, len(diffs), size=(resamples, len(diffs)))
    means = diffs[draws].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


_SCORE = re.compile(r'"?correctness_score"?\s*[:=]\s*"?([01])\b')


def parse_judge(reply: str | None) -> int | None:
    """The correctness score (0 or 1) from a judge reply, or None when there is none to read."""
    if not reply:
        return None
    start, end = reply.find("{"), reply.rfind("}")
    if 0 <= start < end:
        try:
            obj = json.loads(reply[start:end + 1], strict=False)
            score = obj.get("correctness_score") if isinstance(obj, dict) else None
            if isinstance(score, bool):
                return None
            if isinstance(score, (int, float, str)) and str(score).strip() in ("0", "1", "0.0", "1.0"):
                return int(float(score))
            return None
        except json.JSONDecodeError:
            pass
    m = _SCORE.search(reply)
    return int(m.group(1)) if m else None


@dataclasses.dataclass
class JudgeResult:
    scores: list[int | None]  # per sample; None = unscored

    @property
    def scored(self) -> int:
        return sum(s is not None for s in self.scores)

    @property
    def unscored(self) -> int:
        return len(self.scores) - self.scored

    @property
    def mean(self) -> float | None:
        vals = [s for s in self.scores if s is not None]
        return sum(vals) / len(vals) if vals else None


def judge(endpoint: ChatEndpoint, api_key: str | None, items: list[dict]) -> JudgeResult:
    """Score items {question, context, reference, answer} with the Appendix B rubric."""
    client = ChatClient(endpoint, api_key)
    scores: list[int | None] = []
    for it in items:
        prompt = JUDGE_INPUT.format(**{k: it.get(k, "") for k in ("question", "context", "reference", "answer")})
        try:
            reply = client.complete(prompt, system=JUDGE_SYSTEM)
        except EndpointError:
            reply = None
        scores.append(parse_judge(reply))
    return JudgeResult(scores)
