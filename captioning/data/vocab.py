"""Word vocabulary with the special tokens fixed by the design: ``<pad>``=0, ``<bos>``, ``<eos>``, ``<unk>``."""

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


class Vocabulary:
    """Maps words to ids and back; built from training captions only."""

    PAD_ID = 0

    def __init__(self, tokens: Sequence[str]) -> None:
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary must start with the special tokens {SPECIAL_TOKENS}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary must not repeat a token")
        self.tokens: list[str] = list(tokens)
        self._index = {token: i for i, token in enumerate(self.tokens)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(len(SPECIAL_TOKENS))

    @classmethod
    def build(cls, tokenized_captions: Iterable[Sequence[str]], min_count: int = 5) -> "Vocabulary":
        """Keep words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(word for caption in tokenized_captions for word in caption)
        words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
                       key=lambda w: (-counts[w], w))
        return cls([*SPECIAL_TOKENS, *words])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def fingerprint(self) -> str:
        """sha256 of the tokens in order: a model's output ids mean these words only in this order, so a
        checkpoint or export records it beside its weights and a reordered copy is caught on loading."""
        return hashlib.sha256(json.dumps(self.tokens).encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def encode(self, words: Sequence[str], max_length: int | None = None) -> list[int]:
        """Words -> ``[<bos>, w1..wn, <eos>]`` ids; truncated to ``max_length`` words first."""
        words = words[:max_length] if max_length is not None else words
        return [self.bos_id, *(self._index.get(w, self.unk_id) for w in words), self.eos_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> words, stopping at ``<eos>`` and dropping ``<bos>``/``<pad>``."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.bos_id, self.pad_id):
                words.append(self.tokens[i])
        return words

    def unknown_rate(self, tokenized_captions: Iterable[Sequence[str]]) -> float:
        """Fraction of word occurrences that map to ``<unk>``."""
        total = unknown = 0
        for caption in tokenized_captions:
            total += len(caption)
            unknown += sum(w not in self._index for w in caption)
        return unknown / total if total else 0.0
