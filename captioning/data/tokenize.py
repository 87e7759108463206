"""Caption tokenization shared by training data and decoding.

The evaluator scores captions after Stanford's PTB tokenizer has lowercased them and dropped
punctuation tokens, so training targets are tokenized the same way: lowercase words, with
punctuation removed, hyphenated words kept whole and clitics split off (``"dog's"`` -> ``"dog" "'s"``).
"""

import re

_TOKEN_PATTERN = re.compile(r"n't|'[a-z]+|[a-z0-9]+(?:-[a-z0-9]+)*(?:[.,][0-9]+)*")
_CLITIC = re.compile(r"([a-z])(n't|'[a-z]+)\b")


def tokenize(caption: str) -> list[str]:
    """Split a raw caption into lowercase word tokens without punctuation."""
    text = _CLITIC.sub(r"\1 \2", caption.lower())
    return _TOKEN_PATTERN.findall(text)


def detokenize(tokens: list[str]) -> str:
    """Join tokens into the caption string written to results files."""
    return " ".join(tokens)
