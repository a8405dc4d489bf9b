"""Scores checked against values computed by hand on small fixed examples."""

from __future__ import annotations

import pytest

from data_ops.scoring import bleu, bootstrap_ci, exact_match, exact_matches, parse_judge, wer


def test_wer_by_hand_with_whisper_normalization():
    # "Hello, World!" vs "hello world": punctuation and case are normalized away -> 0 errors
    assert wer(["Hello, World!"], ["hello world"], "en") == 0.0
    # 4 reference words, 1 substitution ("sat" -> "sit") and 1 deletion ("the") -> 2/4
    assert wer(["The cat sat down."], ["cat sit down"], "en") == pytest.approx(0.5)
    # English normalizer: "twenty-one" and "21" are the same number; "Mr." and "mister" the same word
    assert wer(["Mr. Smith has twenty-one apples."], ["mister smith has 21 apples"], "en") == 0.0
    # corpus-level: (0 + 1) errors over (2 + 3) words = 0.2
    assert wer(["a b", "c d e"], ["a b", "c x e"], "en") == pytest.approx(0.2)
    # basic normalizer for other languages: case and punctuation only (numbers are not rewritten)
    assert wer(["Heute ist Montag."], ["heute ist montag"], "de") == 0.0
    assert wer(["Die Zahl ist 5."], ["die zahl ist fünf"], "de") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        wer(["  "], ["x"], "en")


def test_bleu_by_hand():
    assert bleu(["the cat is on the mat"], ["the cat is on the mat"]) == pytest.approx(100.0)
    assert bleu(["the cat is on the mat"], ["dogs run fast"]) == pytest.approx(0.0, abs=1e-9)
    # 6-word hypothesis, reference 6 words, 5/6 unigrams, 3/5 bigrams, 1/4 trigrams, 0/3 4-grams: sacrebleu smooths
    # the zero count ('exp' smoothing: 1/2 for the first zero) -> exp(mean(log [5/6, 3/5, 1/4, 1/(2*3)])) * BP(=1)
    import math

    want = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(1 / 6)) / 4)
    assert bleu(["the cat is on the mat"], ["the cat sat on the mat"]) == pytest.approx(want, abs=0.01)


def test_exact_match_ignores_case_and_punctuation_only():
    assert exact_match(["12 plus 7 is 19."], ["12 plus 7 is 19"]) == 1.0
    assert exact_match(["The largest number is 9."], ["the largest number is 9!"]) == 1.0
    assert exact_match(["19"], ["nineteen"]) == 0.0
    assert exact_match(["a", "b", "c", "d"], ["a", "b", "x", "y"]) == 0.5
    assert exact_matches(["a", "b", "c"], ["A.", "x", "c"]) == [True, False, True]


def test_bootstrap_interval_of_a_score_and_of_a_paired_difference():
    # 10 of 100 right: the normal approximation gives 0.1 +- 1.96 * sqrt(0.1 * 0.9 / 100) = [0.041, 0.159]
    lo, hi = bootstrap_ci([1] * 10 + [0] * 90)
    assert 0.03 <= lo <= 0.05 and 0.15 <= hi <= 0.17, (lo, hi)
    # two models right on the same 10 samples: the paired difference is exactly 0 in every resample, while each
    # score alone is as uncertain as above
    assert bootstrap_ci([1] * 10 + [0] * 90, [1] * 10 + [0] * 90) == (0.0, 0.0)
    # 7 right by both, 3 by the first only, 6 by the second only (0.10 vs 0.13): the difference -0.03 is within noise
    a = [1] * 7 + [1] * 3 + [0] * 6 + [0] * 84
    b = [1] * 7 + [0] * 3 + [1] * 6 + [0] * 84
    lo, hi = bootstrap_ci(a, b)
    assert lo < 0 < hi and lo == pytest.approx(-0.03 - 1.96 * 0.0296, abs=0.015), (lo, hi)
    # 40 right by the first only: a difference no resample undoes
    lo, hi = bootstrap_ci([1] * 50 + [0] * 50, [1] * 10 + [0] * 90)
    assert 0.3 <= lo < 0.4 < hi <= 0.5, (lo, hi)
    with pytest.raises(ValueError, match="same samples"):
        bootstrap_ci([1, 0], [1])


@pytest.mark.parametrize("reply,score", [
    ('{"correctness_score": 1, "correctness_explanation": "ok", "redundancy_score": 2, "redundancy_explanation": "-"}', 1),
    ('```json\n{"correctness_score": "0", "redundancy_score": 5}\n```', 0),
    ('correctness_score: 1\nredundancy_score: 3', 1),
    ("I think the answer is fine.", None),
    ('{"correctness_score": 7}', None),
    ('{"correctness_score": true}', None),
    ("", None),
])
def test_parse_judge(reply, score):
    assert parse_judge(reply) == score


def test_judge_against_a_loopback_openai_server_counts_garbage_as_unscored():
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from data_ops.scoring import JUDGE_SYSTEM, judge
    from data_ops.llm_client import ChatEndpoint

    seen = []

    class Judge(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body["messages"])
            answer = body["messages"][-1]["content"].split("[Start of Assistant's Answer]\n")[1].split("\n")[0]
            if answer == "down":
                self.send_response(503)
                self.end_headers()
                return
            content = {"good": '{"correctness_score": 1, "correctness_explanation": "right", "redundancy_score": 1,'
                               ' "redundancy_explanation": "-"}',
                       "bad": '{"correctness_score": 0, "correctness_explanation": "wrong", "redundancy_score": 1,'
                              ' "redundancy_explanation": "-"}',
                       "garbage": "lorem ipsum, I like trains"}[answer]
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = ChatEndpoint(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", model="judge",
                                api_key_env=None, max_retries=1)
        items = [{"question": "Who?", "context": "My name is Anna.", "reference": "Anna", "answer": a}
                 for a in ("good", "bad", "garbage", "down")]
        result = judge(endpoint, None, items)
    finally:
        server.shutdown()
        server.server_close()
    assert result.scores == [1, 0, None, None]
    assert (result.scored, result.unscored, result.mean) == (2, 2, 0.5)
    assert seen[0][0] == {"role": "system", "content": JUDGE_SYSTEM}
    assert "[Question]\nWho?\n[Context]\nMy name is Anna.\n[Start of Reference Answer]\nAnna" in seen[0][1]["content"]
