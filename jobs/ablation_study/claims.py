"""The paper's Table 4 pattern as checks on measured metrics (`check_claims`), with bootstrap intervals on the
spoken-instruction checks from the per-sample matches each evaluation run logged (`spoken_instruction_matches`).
Nothing here is tuned to make a check hold; a check without its metrics is reported as not measured."""

from __future__ import annotations


# The content check's gap (nats per answer token, other utterance of the same length minus right audio): a model
# that reads the audio is far above the first, one that never learned to is within the second of zero.
CONTENT_GAP_CLEAR = 0.3
CONTENT_GAP_NONE = 0.1


def check_claims(rows: dict[str, dict[str, float]], suite: str, roles: dict[str, str],
                 spoken: dict[str, dict[str, bool]] | None = None) -> list[dict]:
    """The paper's Table 4 pattern as checks on the measured metrics: each says what it compares and whether the
    numbers show it. Nothing is tuned to make one hold; a check without its metrics is reported as such.

    `spoken`: label -> {sample id: exact match} on the spoken instructions. With it, the spoken-instruction checks
    carry a bootstrap 95% interval (`ci95`: of joint - B1, paired; of joint's score) and `within_noise`: whether
    the interval holds the check's boundary, i.e. whether these samples can tell at all (the paper's own gap there
    is 0.191 vs 0.181; a miniature's 100 samples move in steps of 0.01).

    `roles`: which row is joint, speech_only (B1) and frozen_lm (B2) (`AblationConfig.roles`); the text LM's row
    is "text-lm"."""
    roles = {"text_lm": "text-lm", **roles}

    def m(role: str, metric: str) -> float | None:
        return rows.get(roles.get(role, ""), {}).get(f"eval/{suite}/{metric}")

    checks = []

    def claim(text: str, a: float | None, b: float | None, holds, ci: tuple[float, float] | None = None,
              boundary: float = 0.0) -> None:
        ok = None if a is None or b is None else bool(holds(a, b))
        checks.append({"claim": text, "values": [a, b], "holds": ok})
        if ci is not None:
            checks[-1].update(ci95=[round(ci[0], 4), round(ci[1], 4)], within_noise=bool(ci[0] <= boundary <= ci[1]))

    text, wer, bleu, follows = "text/exact_match", "asr/wer", "ast/bleu", "spoken_instruction/exact_match"
    gap = "speech/content_gap"
    claim("joint SFT transcribes held-out voices: joint ASR WER <= 0.5",
          m("joint", wer), 0.5, lambda a, b: a <= b)
    claim("joint SFT's speech comes from the audio: joint ASR WER at least 0.3 below the text LM's",
          m("joint", wer), m("text_lm", wer), lambda a, b: a <= b - 0.3)
    claim("joint SFT reaches speech quality close to B1: joint ASR WER <= B1's + 0.1",
          m("joint", wer), m("speech_only", wer), lambda a, b: a <= b + 0.1)
    claim("joint SFT translates close to B1: joint AST BLEU >= B1's - 3",
          m("joint", bleu), m("speech_only", bleu), lambda a, b: a >= b - 3)
    claim("B2 (frozen LM) is worse on speech: B2 ASR WER > joint's",
          m("frozen_lm", wer), m("joint", wer), lambda a, b: a > b)
    claim("joint SFT keeps text accuracy: joint text exact match >= 90% of the text LM's",
          m("joint", text), m("text_lm", text), lambda a, b: a >= 0.9 * b)
    claim("B1 (speech-only SFT) forgets text: B1 text exact match <= 50% of the text LM's",
          m("speech_only", text), m("text_lm", text), lambda a, b: a <= 0.5 * b)
    claim("joint SFT follows spoken instructions better than B1: exact match joint > B1",
          m("joint", follows), m("speech_only", follows), lambda a, b: a > b,
          ci=_spoken_ci(spoken, roles.get("joint"), roles.get("speech_only")), boundary=0.0)
    claim("joint SFT follows spoken instructions: exact match >= 0.1",
          m("joint", follows), 0.1, lambda a, b: a >= b, ci=_spoken_ci(spoken, roles.get("joint")), boundary=0.1)
    speech_labels = [label for label in rows if label != "text-lm"]
    gaps = [rows[label].get(f"eval/{suite}/{gap}") for label in speech_labels]
    claim(f"every speech recipe reads the audio: content gap >= {CONTENT_GAP_CLEAR} nats/token "
          f"({', '.join(speech_labels)}; the smallest is shown)",
          None if any(g is None for g in gaps) else min(gaps), CONTENT_GAP_CLEAR, lambda a, b: a >= b)
    claim(f"the text LM (never trained on audio) has no content gap: |gap| < {CONTENT_GAP_NONE}",
          m("text_lm", gap), CONTENT_GAP_NONE, lambda a, b: abs(a) < b)
    return checks


def _spoken_ci(spoken: dict[str, dict[str, bool]] | None, label: str | None,
               baseline: str | None = None) -> tuple[float, float] | None:
    """Bootstrap interval of `label`'s spoken-instruction score (minus `baseline`'s, paired), or None without
    both models' samples on the same ids."""
    from data_ops.scoring import bootstrap_ci

    ids = sorted((spoken or {}).get(label or "", {}))
    if not ids or (baseline and sorted(spoken.get(baseline, {})) != ids):
        return None
    return bootstrap_ci([spoken[label][i] for i in ids], [spoken[baseline][i] for i in ids] if baseline else None)


def spoken_instruction_matches(client, evaluated: dict[str, str], suite_name: str,
                               labels: list[str]) -> dict[str, dict[str, bool]]:
    """label -> {sample id: exact match} on the suite's `spoken_instruction` task, from the samples each model's
    evaluation run logged (models without that task are left out)."""
    from data_ops.scoring import exact_matches
    from jobs.evaluation.run import logged_samples

    out = {}
    for label in labels:
        rows = logged_samples(client, evaluated[label], suite_name, "spoken_instruction") if label in evaluated else []
        if rows:
            out[label] = dict(zip((r["id"] for r in rows),
                                  exact_matches([r["reference"] for r in rows], [r["prediction"] for r in rows])))
    return out
