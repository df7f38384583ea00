"""The teachers' caption encoder: a word vocabulary and token embeddings trained with the
teacher (no pretrained text encoder exists offline). An empty caption encodes to zeros: the
unconditional input classifier-free guidance needs, which training sees one time in ten."""
import re
from collections import Counter
from typing import List, Sequence

import torch
import torch.nn as nn

PAD, UNKNOWN = 0, 1


class Vocabulary:
    def __init__(self, words: Sequence[str]):
        self.words = list(words)
        self.index = {w: i + 2 for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Sequence[str]) -> "Vocabulary":
        """Every word of the training captions, most frequent first (ties by spelling)."""
        counts = Counter(w for c in captions for w in words_of(c))
        return cls(sorted(counts, key=lambda w: (-counts[w], w)))

    def __len__(self):
        return len(self.words) + 2

    def encode(self, captions: Sequence[str], length: int) -> torch.Tensor:
        """(B, length) token ids: words in order, cut at ``length``, then padding."""
        ids = torch.full((len(captions), length), PAD, dtype=torch.long)
        for i, caption in enumerate(captions):
            row = [self.index.get(w, UNKNOWN) for w in words_of(caption)][:length]
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return ids


def words_of(caption: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())


class CaptionEncoder(nn.Module):
    """Token embedding plus a position embedding: (B, L) ids -> context (B, L, D), with padding
    positions exactly zero, and pooled (B, D), the mean over the caption's words."""

    def __init__(self, vocabulary_size: int, length: int, dim: int):
        super().__init__()
        self.token = nn.Embedding(vocabulary_size, dim)
        self.position = nn.Parameter(torch.zeros(length, dim))
        nn.init.normal_(self.token.weight, std=1.0)
        nn.init.normal_(self.position, std=0.1)

    def forward(self, ids: torch.Tensor):
        mask = (ids != PAD).unsqueeze(-1).to(self.position.dtype)
        context = (self.token(ids) + self.position) * mask
        pooled = context.sum(1) / mask.sum(1).clamp_min(1)
        return context, pooled
