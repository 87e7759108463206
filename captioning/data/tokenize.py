"""Caption tokenization shared by training data, decoding and (without Java) evaluation.

The COCO evaluator (pycocoevalcap) scores captions after Stanford CoreNLP 3.4.1's
``PTBTokenizer -preserveLines -lowerCase`` (Java) has tokenized them and pycocoevalcap has dropped
its punctuation tokens. Training targets should be tokenized the same way, and the evaluator needs
a fallback when Java is missing, so this module reimplements that tokenizer in pure Python:
``ptb_tokenize_python(caption)`` returns exactly the tokens of
``captioning.evaluation.tokenizer.ptb_tokenize([caption])[0].split(" ")`` (empty: ``[]``).

How: the Java tokenizer is a JFlex scanner (``PTBLexer``). At each position every rule is tried,
the longest match wins and ties go to the rule listed first; a rule ``r1/r2`` only matches when
the trailing context ``r2`` follows, which counts towards its length but is not consumed.
``_scanner()`` lists the scanner's rules in its order (those that can apply to plain text); their
behaviour was read off the 3.4.1 jar by running it on probe strings, and
``tests/test_ptb_tokenizer.py`` and ``benchmarks/ptb_agreement.py`` check this module against it.
Shortcuts (``_FAST_PATH``) handle plain words, spaces and lone commas/periods where no rule can
match longer, which makes it about 15x faster.

Two things make whole-batch tokenization differ from one caption at a time, and
``ptb_tokenize_python_batch`` reproduces them: Java tokenizes all captions as one text, one per
line, and some trailing contexts look into the next line (``"... reads K."`` keeps its period
unless the next caption starts with ``"An "``, ``"The "``...); and at the very end of the text,
contexts that need a following character fail.

Known approximations (none occurs in COCO captions): letters and digits are Python's Unicode
categories (L*, Mn, Mc / Nd) where Java's 2014 tables are older, and Java's word-boundary rule
for a final lowercase sigma is approximated.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, removed after tokenization here and by the Java
# path (captioning.evaluation.tokenizer). Java lowercases first, so "-LRB-" never matches: "(" survives
# as "-lrb-" in the evaluator too.
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                         ".", "?", "!", ",", ":", "-", "--", "...", ";"])


# what Java's scanner treats as the end of a line: each caption must stay on its own line
_LINE_BREAKS = re.compile("\r\n?|[\n\u2028\u2029\u000b\u000c\u0085]")


def one_line(caption: str) -> str:
    """The caption with every line break made a space, so that one caption is one scanner line."""
    return _LINE_BREAKS.sub(" ", caption)


def tokenize(caption: str) -> list[str]:
    """Training-target tokens: the evaluator's PTB tokens (lowercase, punctuation removed)."""
    return ptb_tokenize_python(caption)


def detokenize(tokens: list[str]) -> str:
    """Join tokens into the caption string written to results files."""
    return " ".join(tokens)


def ptb_tokenize_python(caption: str) -> list[str]:
    """The tokens of ``ptb_tokenize([caption])[0].split(" ")``, without Java ([] when empty)."""
    return _evaluator_tokens(_scan(one_line(caption))[0])


def ptb_tokenize_python_batch(captions: Sequence[str]) -> list[str]:
    """Drop-in for ``ptb_tokenize(captions)``: one space-joined string per caption.

    The captions are scanned together, one per line, like the single Java call does, so a
    caption's tokens may depend on the next caption (see the module docstring).
    """
    if not captions:
        return []
    lines = _scan("\n".join(one_line(caption) for caption in captions))
    return [" ".join(_evaluator_tokens(tokens)) for tokens in lines[: len(captions)]]


def _evaluator_tokens(tokens: list[str]) -> list[str]:
    """What ``ptb_tokenize`` keeps of one Java output line: lowercase, split on " ", no punctuation."""
    line = " ".join(_java_lower(token) for token in tokens).rstrip()  # ptb_tokenize's str.rstrip
    return [word for word in line.split(" ") if word and word not in PUNCTUATION]


# A word for Java's final-sigma rule: letters, digits, marks and "_"; dashes, quotes and periods
# join two letters ("U—Σ" is one word, "5-Σ" is not).
_JAVA_WORD = re.compile(r"[\w\u0300-\u036f\u00ad]+(?:(?:(?<=[^\W\d_])|(?<=[\u0300-\u036f]))"
                        r"[-\u2010-\u2015'\".\u2027](?=[^\W\d_])[\w\u0300-\u036f\u00ad]+)*")


def _java_lower(token: str) -> str:
    """Java's ``String.toLowerCase``: ``str.lower`` but for where a capital sigma becomes final ``ς``.

    Java writes ``ς`` when a cased letter precedes the sigma in the same word and none follows it;
    Python only looks at the neighbouring characters ("ΟΔΟΣ1A": Java "οδοσ1a", Python "οδος1a").
    """
    if "\u03a3" not in token:
        return token.lower()

    def lower_word(match: re.Match[str]) -> str:
        word = match.group()
        cased = [c.lower() != c.upper() for c in word]
        return "".join("\u03c2" if c == "\u03a3" and any(cased[:i]) and not any(cased[i + 1:]) else c.lower()
                       for i, c in enumerate(word))

    return _JAVA_WORD.sub(lower_word, token).lower()


# ------------------------------------------------------------------------------------- scanner

_Action = Callable[[str], tuple[str | None, int]]  # matched text -> (token or None, characters consumed)


@dataclass(frozen=True)
class _Rule:
    """A scanner rule: alternatives (the longest one counts) and what to emit for the match."""

    name: str
    patterns: tuple[re.Pattern[str], ...]  # a trailing context is the lookahead group "context"
    action: _Action


@dataclass(frozen=True)
class _Scanner:
    rules: tuple[_Rule, ...]
    period_words: re.Pattern[str]  # words that may keep a following period ("St." "Mr." "No.")


def _scan(text: str) -> list[list[str]]:
    """Tokens of ``text`` as the Java scanner emits them (not yet lowercased), one list per line."""
    astral = _ASTRAL.search(text) is not None
    if astral:  # Java sees characters beyond U+FFFF as two UTF-16 surrogates
        text = _ASTRAL.sub(lambda m: _surrogate_pair(ord(m.group())), text)
    scanner = _scanner()
    lines: list[list[str]] = [[]]
    position, end = 0, len(text)
    while position < end:
        fast = _FAST_PATH.match(text, position)
        if fast is not None and _fast_path_applies(fast, scanner):
            if fast.lastgroup == "word" or fast.lastgroup == "word_before_period":
                lines[-1].append(fast.group())
            elif fast.lastgroup == "newline":
                lines.append([])
            position = fast.end()  # spaces and a lone "," or "." (punctuation) emit nothing
            continue
        rule, matched = _longest_match(scanner.rules, text, position)
        if rule is None:  # untokenizable character: Java logs a warning and deletes it
            position += 1
            continue
        token, consumed = rule.action(matched)
        if token == _LINE_BREAK:
            lines.append([])
        elif token is not None:
            lines[-1].append(_from_utf16(token) if astral else token)
        position += consumed
    return lines


def _longest_match(rules: tuple[_Rule, ...], text: str, position: int) -> tuple[_Rule | None, str]:
    """JFlex's choice: the longest match (trailing context included), the first rule on ties."""
    best_rule, best_text, best_length = None, "", 0
    for rule in rules:
        for pattern in rule.patterns:
            match = pattern.match(text, position)
            if match is not None:
                length = (match.end("context") if "context" in pattern.groupindex else match.end()) - position
                if length > best_length:
                    best_rule, best_text, best_length = rule, match.group(), length
    return best_rule, best_text


# Shortcuts for the common cases, taken only where no rule can match longer: a plain word before a
# space, a line end, the end or ", "; a word that is no abbreviation before ". "; spaces; "\n";
# and a lone "," or "." (dropped as punctuation) that cannot start a number or an ellipsis.
_FAST_PATH = re.compile(r"(?P<word>[A-Za-z]+)(?=[ \n]|,(?:[ \n]|\Z)|\Z)"
                        r"|(?P<word_before_period>[A-Za-z]{2,})(?=\.(?:[ \n]|\Z))"
                        r"|(?P<spaces> +)|(?P<newline>\n)"
                        r"|(?P<punctuation>,(?=[ \n]|\Z)|\.(?= [^.]|\n|\Z))")
_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _fast_path_applies(match: re.Match[str], scanner: _Scanner) -> bool:
    if match.lastgroup == "word":
        return match.group().lower() not in _ASSIMILATIONS
    if match.lastgroup == "word_before_period":
        word = match.group()
        return word.lower() not in _ASSIMILATIONS and scanner.period_words.fullmatch(word) is None
    return True


_LINE_BREAK = "\n"  # emitted by the newline rule; never a token
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _surrogate_pair(code: int) -> str:
    code -= 0x10000
    return chr(0xD800 + (code >> 10)) + chr(0xDC00 + (code & 0x3FF))


def _from_utf16(token: str) -> str:
    return token.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


# ------------------------------------------------------------------------------------- actions

def _keep(text: str) -> tuple[str | None, int]:
    return text, len(text)


def _drop(text: str) -> tuple[str | None, int]:
    return None, len(text)


def _replace(mapping: Callable[[str], str]) -> _Action:
    return lambda text: (mapping(text), len(text))


def _push_back(count: int) -> _Action:
    """Emit all but the last ``count`` characters and scan those again (JFlex ``yypushback``)."""
    return lambda text: (text[:-count], len(text) - count)


def _keep_and_rescan_period(text: str) -> tuple[str | None, int]:
    """"Blvd. A" -> "Blvd." then "." again (Java repeats the period as the sentence end)."""
    return text, len(text) - 1


def _acronym_before_sentence(text: str) -> tuple[str | None, int]:
    """"U.S. The" -> "U.S." and "."; a single letter loses its period: "K. The" -> "K" and "."."""
    return (text[0], 1) if len(text) == 2 else (text, len(text) - 1)


def _without_soft_hyphens(text: str) -> str:
    return text.replace("\u00ad", "") or "-"


def _space_to_nbsp(text: str) -> str:
    return text.replace(" ", "\u00a0")


def _normalize_parentheses(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


def _normalize_ampersand(text: str) -> str:
    return _AMP_ENTITY.sub("&", text)


_AMP_ENTITY = re.compile("(?i:&amp;)")
_SINGLE_QUOTE = re.compile("'|(?i:&apos;)")
_DOUBLE_QUOTE = re.compile("\"|(?i:&quot;)")
_LATEX_QUOTES = [(re.compile("[\u0091\u2018\u201b\u2039]"), "`"), (re.compile("[\u0092\u2019\u203a]"), "'"),
                 (re.compile("[\u0093\u201c\u00ab]"), "``"), (re.compile("[\u0094\u201d\u00bb]"), "''")]


def _quotes(opening: bool) -> _Action:
    """ASCII, entity and curly quotes to the PTB's LaTeX style: `` ` (opening), '' ' (closing)."""
    def action(text: str) -> tuple[str | None, int]:
        token = _SINGLE_QUOTE.sub("`" if opening else "'", text)
        token = _DOUBLE_QUOTE.sub("``" if opening else "''", token)
        for pattern, replacement in _LATEX_QUOTES:
            token = pattern.sub(replacement, token)
        return token, len(text)
    return action


_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}


# --------------------------------------------------------------------------------------- rules

@cache
def _unicode_classes() -> dict[str, str]:
    """Regex class bodies: letters (L*), combining marks (Mn, Mc), digits (Nd); Java chars only."""
    members: dict[str, list[int]] = {"alpha": [], "mark": [], "digit": []}
    for code in range(0x10000):
        category = unicodedata.category(chr(code))
        if category[0] == "L":
            members["alpha"].append(code)
        elif category in ("Mn", "Mc"):
            members["mark"].append(code)
        elif category == "Nd":
            members["digit"].append(code)
    return {name: _class_body(codes) for name, codes in members.items()}


def _class_body(codes: list[int]) -> str:
    """Sorted code points as regex class ranges ("a-z...")."""
    parts, start = [], codes[0]
    for previous, code in zip(codes, codes[1:] + [-1]):
        if code != previous + 1:
            last = "" if previous == start else "-" + re.escape(chr(previous))
            parts.append(re.escape(chr(start)) + last)
            start = code
    return "".join(parts)


def _caseless_first_upper(words: str) -> str:
    """JFlex ``[A]bout``: first letter upper case only, the rest in any case."""
    return "|".join(f"[{w[0]}](?i:{w[1:]})" if len(w) > 1 else w for w in words.split("|"))


@cache
def _scanner() -> _Scanner:
    """PTBLexer's rules in its order, built on first use (about 0.1 s)."""
    classes = _unicode_classes()
    alpha = f"[{classes['alpha']}]"                                        # JFlex [:letter:]
    d = f"[{classes['digit']}]"                                            # JFlex [:digit:]
    alnum = f"[{classes['alpha']}{classes['digit']}]"
    letter = f"(?:[{classes['alpha']}{classes['mark']}\u00ad]|&[aeiouAEIOU](?i:acute|grave|uml);)"
    space = "[ \t\u00a0\u2000-\u200a\u3000]"
    newline = "\r\n?|[\n\u2028\u2029\u000b\u000c\u0085]"
    space_nl = f"(?:{space}|{newline})"
    apos = "(?:['\u0092\u2019]|(?i:&apos;))"
    apos_etc = "(?:['`\u0092\u2019\u0091\u2018\u201b]|(?i:&apos;))"         # also accepted inside words
    word = f"{letter}(?:{letter}|{d})*(?:[.!?]{letter}(?:{letter}|{d})*)*"  # "mp3", "ground.a" is one word
    clitic = f"{apos}(?:[msdMSD]|(?i:re|ve|ll))"                              # 's 'm 'd 're 've 'll
    nt = f"[nN]{apos_etc}[tT]"
    num = f"{d}*(?:[.:,\u00ad\u066b\u066c]{d}+)+|{d}+"                         # 3.5 1,000 12:30
    acro_special = r"(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r))"
    acro = rf"[A-Za-z](?:\.[A-Za-z])*|{acro_special}"                         # U.S  T.V  K
    hyphen = "[-_\u058a\u2010\u2011]"
    thing_part = f"(?:[dDoOlL]{apos_etc}{alnum})?{alnum}+"                    # o'clock d'oeuvre
    thing = f"{thing_part}(?:{hyphen}{thing_part})*"                           # t-shirt 5-year-old 2x4
    hthing = (rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*"                              # 5.5-inch U.S.-based
              rf"(?:-(?:(?:[A-Za-z](?:\.[A-Za-z])+|{acro_special})\.|[A-Za-z0-9\u00ad]+))+")
    thinga = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"                            # AT&T
    insentp = "[,;:\u3001]"
    file_name = (f"(?:{letter}|{d})+(?:\\.(?:{letter}|{d})+)*\\.(?i:bat|bmp|c|class|cgi|cpp|dll|docx?|exe|gif"
                 "|gz|h|html?|jar|java|jpe?g|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)")
    name = "[A-Za-z][A-Za-z0-9_:.-]*"
    attribute = f"{name}(?: *= *(?:'[^'\\r\\n]*'|\"[^\"\\r\\n]*\"))?"      # b or b="c"
    sgml = f"<(?:[!?][A-Za-z-][^>\\r\\n]*|{name}(?: +{attribute})* */?|/{name}) *>"  # <b> </a> <a b="c">
    # Abbreviations that keep their period ("St." "Mr." "Blvd."); [A]-style classes are case-sensitive.
    abbrev1 = ("(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri|ala|ariz"
               "|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn"
               "|va|vt|wisc?|wyo|inc|cos?|corp|ltd|plc|rt|bancorp|dept|bhd|assn|univ|intl|sys|tel|est"
               "|ext|sq|ft|jr|sr|bros|ed\\.d|ph\\.d|blvd|rd|esq|etc|al|seq|bldg)"
               "|[A](?i:z|rk)|[D](?i:el)|[I](?i:ll)|[L](?i:a)|[M](?i:ass|iss)|[O](?i:re)|[P](?i:a)"
               "|[T](?i:ex)|[W](?i:ash)|(?i:pp?t)[ye](?i:s)?")
    abbrev2 = ("(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl"
               "|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|ft|adj|adv|asst"
               "|assoc|ens|insp|mlle|mme|msgr|sfc|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph|invt|elec"
               "|natl)|[M](?i:iss)|(?i:m)[ft](?i:g)")  # and any acronym
    abbrev3 = "(?i:ca|figs?|prop|nos?|art|bldg|pp|op)"                         # "No. 5": before a number
    sentence_start = _caseless_first_upper(
        "About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last"
        "|Many|More|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Their|Then|There"
        "|These|They|This|We|When|While|What|Yet|You") + f"|{sgml}"
    not_email = "[^ \\t\\n\\f\\r\"<>|(){}\\u00a0"  # class left open: append more characters and "]"
    misc_symbol = ("+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387"
                   "\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b"
                   "\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017"
                   "\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e"
                   "\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20"
                   "\uff3b-\uff40\uff5b-\uff65")

    def rule(name: str, *alternatives: str, context: str | None = None, action: _Action = _keep) -> _Rule:
        suffix = "" if context is None else f"(?=(?P<context>{context}))"  # counts, is not consumed
        return _Rule(name, tuple(re.compile(f"(?:{a}){suffix}") for a in alternatives), action)

    word_action = _replace(_without_soft_hyphens)
    rules = (
        rule("programming_language", r"(?i:c\+\+|[cf]#)"),
        # assimilations: "cannot" -> "can" "not", "gonna" -> "gon" "na", "'tis" -> "'t" "is"
        rule("assimilation3", "(?i:cannot|'twas)", action=_push_back(3)),
        rule("assimilation2", "(?i:'tis|gonna|gotta|lemme|gimme|wanna)", action=_push_back(2)),
        rule("sgml", sgml, action=_replace(_space_to_nbsp)),
        rule("dash", "&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", action=_replace(lambda _: "--")),
        rule("ampersand_entity", "(?i:&amp;)", action=_replace(lambda _: "&")),
        rule("entity", "&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);"),
        # words; split before a clitic ("it's" -> "it" "'s") or n't ("don't" -> "do" "n't")
        rule("word_before_clitic", word, context=clitic, action=word_action),
        rule("word_before_nt", "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", context=nt, action=word_action),
        rule("word", word, action=word_action),
        rule("apostrophe_word",  # 'n' l' 'em '90s 'til ho'ohu c'mon ... (kept as written)
             f"{apos}(?i:n){apos}?", f"[lLdDjJ]{apos}", f"(?i:dunkin|somethin|ol){apos}", f"{apos}(?i:em)",
             f"[A-HJ-XZn]{apos_etc}{alpha}{{2,}}", f"{apos}[2-9]0(?i:s)", f"{apos}(?i:till?)",
             f"{alpha}+[aeiouyAEIOUY]{apos_etc}[aeiouA-Z]{alpha}*", f"{apos}(?i:cause)",
             f"(?i:o){apos_etc}(?i:o)", r"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)"),
        rule("y_apostrophe", f"(?i:y){apos}", context=alpha),  # y'all -> y' all
        rule("url", r"(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]"),
        rule("likely_url", *(rf"(?:{host})(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){{}},-])?" for host in (
            r"(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}",
            r"(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu)"))),  # ",-_" is a range in Java too
        rule("email", rf"(?:<|(?i:&lt;))?[a-zA-Z0-9]{not_email}]*@(?:{not_email}.]+\.)*{not_email}.]+"
                      r"(?:>|(?i:&gt;))?"),
        rule("twitter", "@[a-zA-Z_][a-zA-Z_0-9]*", f"#{letter}+"),
        rule("clitic", clitic, context="[^A-Za-z]", action=_quotes(opening=False)),
        rule("nt", nt, action=_quotes(opening=False)),
        # numbers
        rule("date", rf"{d}{{1,2}}[-/]{d}{{1,2}}[-/]{d}{{2,4}}"),
        rule("number", f"[-+]?(?:{num})", action=word_action),
        rule("sub_superscript_number",
             "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"),
        rule("fraction", rf"(?:{d}{{1,4}}[- \u00a0])?{d}{{1,4}}(?:\\?/|\u2044){d}{{1,4}}",  # 22 3/4
             action=_replace(_space_to_nbsp)),
        rule("fraction_character", "[\u00bc\u00bd\u00be\u2153-\u215e]", action=_replace(lambda t: _FRACTIONS.get(t, t))),
        rule("treebank_special", "(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\\.d\\.s|pro-|anti-|s(?:&|&amp;)p-500"
                                 f"|s(?:&|&amp;)ls|cap{apos}n|c{apos}est)", action=_replace(_normalize_ampersand)),
        rule("slashed", r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"),  # and/or
        rule("dollar", r"[A-Z]*\$|#"),
        rule("currency", "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
             action=_replace(lambda t: _CURRENCY.get(t, t))),
        # abbreviations and acronyms: which keep their period
        rule("acronym_before_sentence", rf"(?:{acro})\.", context=f"{space_nl}+(?:{sentence_start}){space_nl}",
             action=_acronym_before_sentence),
        rule("abbreviation_before_number", rf"{abbrev3}\.", context=f"{space_nl}?{d}"),
        rule("abbreviation_sentence_end", rf"(?:{abbrev1})\.", context=f"{space_nl}(?:{space_nl}|[A-Z]|{sgml})",
             action=_keep_and_rescan_period),
        rule("abbreviation_before_two_chars", rf"(?:{abbrev1})\.", context=r"[\s\S]{2}"),  # beats "etc.A"
        rule("abbreviation", rf"(?:{abbrev1})\.", rf"(?:{abbrev2})\.", rf"(?:{acro})\."),
        rule("abbreviation_no_period", abbrev2, acro, context=space),
        rule("acronym_no_period", acro, context=space_nl),
        rule("quoted_year", f"{apos}[0-9][0-9]", context=space_nl),  # '90
        rule("file_name", file_name, context=f"{space_nl}|[.?!,]"),    # 1.jpg
        rule("word_period", rf"{word}\.", context=insentp, action=word_action),  # "dog.,"
        rule("phone", r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
                      r"[0-9]{3,4}[- \u00a0]?[0-9]{3,5}",
             r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
             action=_replace(lambda t: _normalize_parentheses(_space_to_nbsp(t)))),
        # quotes, brackets and other punctuation
        rule("double_quote_opening", "\"|(?i:&quot;)", context="[A-Za-z0-9$]", action=_quotes(opening=True)),
        rule("double_quote", "\"|(?i:&quot;)", action=_quotes(opening=False)),
        rule("delete", "\u007f", action=_drop),
        rule("less_than", "<|(?i:&lt;)", action=_replace(lambda _: "<")),
        rule("greater_than", ">|(?i:&gt;)", action=_replace(lambda _: ">")),
        rule("smiley", r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]", context="[^A-Za-z0-9]",  # :-) ;p
             action=_replace(_normalize_parentheses)),
        rule("asian_smiley", r"[-^x=~<>']_[-^x=~<>']", r"\([-^x=~<>'][_.]?[-^x=~<>']\)",  # ^_^ (-.-)
             action=_replace(_normalize_parentheses)),
        rule("bracket", r"[\[\]{}()]", action=_replace(_BRACKETS.__getitem__)),
        rule("hyphens", "-+", action=_replace(lambda t: "--" if 3 <= len(t) <= 4 else t)),
        rule("ellipsis", "\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", action=_replace(lambda _: "...")),
        rule("marks", "@+|#+|_+", r"\*+|(?:\\\*){1,3}", insentp, "[?!]+",
             "[.=/\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"),
        # hyphenated and other compounds
        rule("hyphenated_period", rf"(?:{hthing})\.", context=insentp, action=word_action),
        rule("hyphenated", hthing, action=word_action),
        rule("thing_period", rf"(?:{thing})\.", context=insentp),
        rule("thing", thing),
        rule("capitals_ampersand_period", rf"(?:{thinga})\.", context=insentp, action=_replace(_normalize_ampersand)),
        rule("capitals_ampersand", thinga, action=_replace(_normalize_ampersand)),
        rule("single_quote_opening", "'", context="[A-Za-z][^ \t\n\r\u00a0]", action=_quotes(opening=True)),
        rule("clitic_anywhere", clitic, action=_quotes(opening=False)),
        rule("quotes", apos, "''", "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094"
                                   "\u201e\u201f\u2039\u203a\u00ab\u00bb]{1,2}", action=_quotes(opening=False)),
        rule("duck_feet", "<<|>>"),
        rule("symbol", f"[{misc_symbol}]"),
        rule("space", f"\u0000|{space}+|[\u200b\u200e\u200f\ufeff]|(?i:&nbsp;)", action=_drop),
        rule("newline", newline, action=lambda text: (_LINE_BREAK, len(text))),
    )
    return _Scanner(rules, re.compile(f"{abbrev1}|{abbrev2}|{abbrev3}|{acro}"))
