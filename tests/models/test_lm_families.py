"""Any chat LM: tiny Gemma, Gemma 2, Gemma 3, Llama 3, Qwen2.5, Qwen3, Phi-3 and Mistral checkpoints (each family's
architecture, special tokens and chat template; `tests/models/lm_families.py`) loaded by path as a hub id would
be: the loss covers exactly the assistant answers, LoRA covers attention and MLP under each family's layer names,
two training steps move the LoRA weights, save -> reload gives the same logits, and generation stops on the
family's own end-of-turn token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from models.config import tiny
from models.conversation import AudioPart, Conversation, ConversationError, TextPart, Turn
from models.processor import IGNORE_INDEX
from models.speechlm import SpeechLM, build_speechlm
from tests.models.lm_families import FAMILIES, save_family_checkpoint

ANSWERS = ["The answer is five.", "Hallo there."]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {name: save_family_checkpoint(name, root) for name in FAMILIES}


def _conversation(system: str | None = None) -> Conversation:
    audio = np.random.default_rng(0).uniform(-0.3, 0.3, 12000).astype(np.float32)
    turns = [Turn.text("system", system)] if system else []
    return Conversation(turns + [
        Turn("user", [TextPart("Listen:"), AudioPart(audio), TextPart("What is two plus three?")]),
        Turn.text("assistant", ANSWERS[0]),
        Turn.text("user", "Translate it to German."),
        Turn.text("assistant", ANSWERS[1]),
    ])


def _model(path) -> SpeechLM:
    cfg = tiny()
    cfg.lm.pretrained = str(path)  # the checkpoint folder, as a hub id: its config, weights and tokenizer
    torch.manual_seed(0)
    return build_speechlm(cfg)


def _label_runs(enc) -> list[list[int]]:
    runs, cur = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            assert label == token
            cur.append(token)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


class ForceAt(LogitsProcessor):
    """Greedy decoding picks `token` as new token number `at` and none of `avoid` before it (a random model may
    emit a stop token anywhere). SpeechLM generates from embeddings: `input_ids` holds only the new tokens."""

    def __init__(self, at: int, token: int, avoid: list[int]):
        self.at, self.token, self.avoid = at, token, avoid

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, -1e9)
            scores[:, self.token] = 0
        elif input_ids.shape[1] < self.at:
            scores[:, self.avoid] = -1e9
        return scores


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_chat_lm_family_trains_saves_and_stops_as_its_template_says(name, checkpoints, tmp_path):
    family = FAMILIES[name]
    model = _model(checkpoints[name])
    tok = model.tokenizer
    eot = tok.convert_tokens_to_ids(family.end_of_turn)

    # 1. labels: exactly the two answers, each with the family's end-of-turn token and nothing of the prompts
    enc = model.processor.encode(_conversation())
    runs = _label_runs(enc)
    assert len(runs) == 2, [tok.decode(r) for r in runs]
    for run, answer in zip(runs, ANSWERS):
        text = tok.decode(run, skip_special_tokens=False).lstrip()
        assert text.startswith(answer), (text, answer)
        assert text[len(answer):].lstrip().startswith(family.end_of_turn), text
        assert eot in run
    prompt_text = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX])
    assert "Translate it to German." in prompt_text and "What is two plus three?" in prompt_text
    assert sum(enc.audio_mask) == model.audio_token_count(12000)

    # 2. LoRA on every linear of attention and MLP, under this architecture's names
    layer = model.lm.get_base_model().model.layers[0]
    linears = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    assert linears and all(n.endswith(".base_layer") for n in linears), linears  # every linear has LoRA
    wrapped = {n.removesuffix(".base_layer") for n in linears}
    assert any("mlp" in n for n in wrapped) and any("attn" in n for n in wrapped), sorted(wrapped)

    # 3. two training steps change the LoRA weights (and only trainable weights)
    batch = model.processor([_conversation(), _conversation()])
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(**batch).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n)

    # 4. save -> reload: the same logits
    model.eval()
    model.save_pretrained(tmp_path / "m")
    again = SpeechLM.from_pretrained(tmp_path / "m")
    probe = model.processor([_conversation()])
    probe.pop("labels")  # the logits, not the loss
    with torch.no_grad():
        torch.testing.assert_close(again(**probe).logits, model(**probe).logits, rtol=1e-4, atol=1e-5)

    # 5. generation stops on the family's end of turn (not only on EOS), wherever the model emits it
    assert eot in again.stop_token_ids()
    conv = Conversation(_conversation().turns[:1])
    texts, ids = again.generate([conv], max_new_tokens=8, return_ids=True,
                                logits_processor=LogitsProcessorList([ForceAt(3, eot, again.stop_token_ids())]))
    assert len(ids[0]) == 3 and eot not in ids[0], ids


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3", "gemma"])
def test_system_prompts_render_as_each_family_puts_them(name, checkpoints):
    model = _model(checkpoints[name])
    conv = _conversation(system="You are a helpful assistant.")
    text, spans = model.processor.render(conv)
    assert "You are a helpful assistant." in text and len(spans) == 2
    assert [text[a:b].lstrip().startswith(ans) for (a, b), ans in zip(spans, ANSWERS)] == [True, True]


def test_a_template_that_moves_the_system_prompt_is_refused_clearly(checkpoints):
    # Mistral v0.3 puts the system prompt into the *last* user turn, so earlier answers' prompts change as the
    # conversation grows: their loss spans cannot be placed, which is an error, never a silent mislabel
    model = _model(checkpoints["mistral"])
    with pytest.raises(ConversationError, match="prefix-wise"):
        model.processor.encode(_conversation(system="You are a helpful assistant."))
    assert model.processor.encode(Conversation(_conversation().turns[:2])).num_label_tokens > 0
