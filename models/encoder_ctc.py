"""A CTC head on the speech encoder, for pretraining an encoder on ASR before SpeechLM training.

The paper starts from Canary's encoder, already trained for ASR. A random-init encoder trained only through the
LM (next-token loss on transcripts) learns acoustics slowly; CTC gives every frame a direct signal, which is how
ASR encoders like Canary's FastConformer are trained in the first place. The head predicts the LM tokenizer's
tokens plus a blank; only the encoder is kept (`jobs.pretrain_encoder` saves it as a Hugging Face checkpoint that
`encoder.pretrained` loads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.speechlm import SpeechEncoder


class EncoderCTC(nn.Module):
    def __init__(self, encoder: SpeechEncoder, vocab_size: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.hidden_size, vocab_size + 1)
        self.blank = vocab_size

    def forward(self, audio: torch.Tensor, audio_lens: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        """Mean CTC loss per target token. `targets`: one token id list per audio (no blanks)."""
        hidden, lens = self.encoder(audio, audio_lens)
        log_probs = F.log_softmax(self.head(hidden).float(), dim=-1).transpose(0, 1)  # (T, N, V+1)
        flat = torch.tensor([t for seq in targets for t in seq], dtype=torch.long, device=audio.device)
        target_lens = torch.tensor([len(seq) for seq in targets], dtype=torch.long, device=audio.device)
        # zero_infinity: an utterance with more tokens than frames contributes nothing instead of inf
        return F.ctc_loss(log_probs, flat, lens, target_lens, blank=self.blank, zero_infinity=True)

    @torch.no_grad()
    def greedy(self, audio: torch.Tensor, audio_lens: torch.Tensor) -> list[list[int]]:
        """Best path per audio: argmax per frame, repeats merged, blanks dropped."""
        hidden, lens = self.encoder(audio, audio_lens)
        best = self.head(hidden).argmax(-1)
        return [ctc_collapse(row[:n], self.blank) for row, n in zip(best.tolist(), lens.tolist())]


def ctc_collapse(frame_ids: list[int], blank: int) -> list[int]:
    """A CTC path to its tokens: repeats merged, then blanks dropped (a blank separates a real repeat)."""
    tokens, prev = [], None
    for t in frame_ids:
        if t != prev and t != blank:
            tokens.append(t)
        prev = t
    return tokens
