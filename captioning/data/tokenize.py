"""Caption tokenization shared by training data, decoding and (without Java) evaluation.

The COCO evaluator (pycocoevalcap) scores captions after Stanford CoreNLP 3.4.1's
``PTBTokenizer -preserveLines -lowerCase`` (Java) has tokenized them and pycocoevalcap has dropped
its punctuation tokens. Training targets must be tokenized the same way, and the evaluator needs a
fallback when Java is missing, so this module reimplements that tokenizer in pure Python:
``ptb_tokenize_python(caption)`` returns exactly the tokens of
``captioning.evaluation.tokenizer.ptb_tokenize([caption])[0].split(" ")``.

How: the Java tokenizer is a JFlex scanner (``PTBLexer``). At each position every rule is tried,
the longest match wins, and ties go to the rule listed first; a rule ``r1/r2`` only matches when
the trailing context ``r2`` follows, which counts towards its length but is not consumed. ``_RULES``
lists the rules that can occur in caption text in the scanner's order (the behaviour was read from
the 3.4.1 jar by running it on probe strings; ``tests/test_ptb_tokenizer.py`` checks it against the
jar). Some trailing contexts look past the end of a line: Java decides whether ``"... reads K."``
keeps its period by looking at the *next* caption (``"An ..."``), so ``ptb_tokenize_python_batch``
tokenizes captions joined by newlines, exactly as the evaluator's single Java call sees them.

Known approximation: letters and digits are Unicode categories L*/Mn/Mc and Nd of Python's
Unicode database (Java's tables are older); English captions are unaffected.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, dropped after tokenization. Java lowercases
# first, so "-LRB-" never matches and "(" survives as "-lrb-", exactly as in the Java pipeline.
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                         ".", "?", "!", ",", ":", "-", "--", "...", ";"])


def tokenize(caption: str) -> list[str]:
    """Training-target tokens: the evaluator's PTB tokens (lowercase, punctuation removed)."""
    return ptb_tokenize_python(caption)


def detokenize(tokens: list[str]) -> str:
    """Join tokens into the caption string written to results files."""
    return " ".join(tokens)


def ptb_tokenize_python(caption: str) -> list[str]:
    """The tokens of ``ptb_tokenize([caption])[0].split(" ")``, without Java ([] when empty)."""
    return _evaluator_tokens(_lex(caption.replace("\n", " "))[0])


def ptb_tokenize_python_batch(captions: Sequence[str]) -> list[str]:
    """Drop-in for ``ptb_tokenize(captions)``: one space-joined string per caption, lexed together.

    Differs from ``ptb_tokenize_python`` per caption only where Java's trailing context reaches
    into the next caption (e.g. a caption ending in ``"K."`` before one starting with ``"An "``).
    """
    if not captions:
        return []
    lines = _lex("\n".join(caption.replace("\n", " ") for caption in captions))
    return [" ".join(_evaluator_tokens(tokens)) for tokens in lines[: len(captions)]]


def _evaluator_tokens(tokens: list[str]) -> list[str]:
    """What pycocoevalcap keeps of one Java output line: lowercase, split on " ", no punctuation."""
    line = " ".join(_java_lower(token) for token in tokens).rstrip()  # str.rstrip, as ptb_tokenize
    return [w for w in line.split(" ") if w and w not in PUNCTUATION]


_WORD_RUN = re.compile(r"[^\W_]+(?:['.:][^\W_]+)*")


def _java_lower(token: str) -> str:
    """``String.toLowerCase``: like ``str.lower`` except for the final-sigma rule.

    Java writes a capital sigma as final ``ς`` when a cased letter precedes it in the same word and
    none follows; Python only looks at the neighbouring characters ("ΟΔΟΣ1A" -> java "οδοσ1a").
    """
    if "\u03a3" not in token:
        return token.lower()

    def lower_word(match: re.Match[str]) -> str:
        word = match.group()
        cased = [c.lower() != c.upper() for c in word]
        return "".join("\u03c2" if c == "\u03a3" and any(cased[:i]) and not any(cased[i + 1:]) else c.lower()
                       for i, c in enumerate(word))

    return _WORD_RUN.sub(lower_word, token).lower()


# --------------------------------------------------------------------------- character classes

@cache
def _unicode_classes() -> dict[str, str]:
    """Regex class bodies for the JFlex classes (Basic Multilingual Plane only, like Java chars)."""
    members: dict[str, list[int]] = {"alpha": [], "mark": [], "digit": []}
    for code in range(0x10000):
        category = unicodedata.category(chr(code))
        if category[0] == "L":
            members["alpha"].append(code)
        elif category in ("Mn", "Mc"):
            members["mark"].append(code)
        elif category == "Nd":
            members["digit"].append(code)
    return {name: _ranges(codes) for name, codes in members.items()}


def _ranges(codes: list[int]) -> str:
    parts, start = [], codes[0]
    for previous, code in zip(codes, codes[1:] + [-1]):
        if code != previous + 1:
            parts.append(re.escape(chr(start)) + ("" if previous == start else "-" + re.escape(chr(previous))))
            start = code
    return "".join(parts)


# --------------------------------------------------------------------------------------- rules

@dataclass(frozen=True)
class _Rule:
    """One scanner rule: alternatives (longest wins), optional trailing context and an action."""

    name: str
    patterns: tuple[re.Pattern[str], ...]
    action: Callable[[str], tuple[str | None, int]]  # text -> (token or None, chars consumed)


def _keep(text: str) -> tuple[str | None, int]:
    return text, len(text)


def _drop(text: str) -> tuple[str | None, int]:
    return None, len(text)


def _replace(mapping: Callable[[str], str]) -> Callable[[str], tuple[str | None, int]]:
    return lambda text: (mapping(text), len(text))


def _push_back(count: int) -> Callable[[str], tuple[str | None, int]]:
    """Emit all but the last ``count`` characters and scan those again (``yypushback``)."""
    return lambda text: (text[:-count], len(text) - count)


def _without_soft_hyphens(text: str) -> str:
    return text.replace("\u00ad", "") or "-"


def _space_to_nbsp(text: str) -> str:
    return text.replace(" ", "\u00a0")


def _normalize_parentheses(text: str) -> str:
    return text.replace("(", "-LRB-").replace(")", "-RRB-")


_SINGLE_QUOTE = re.compile(r"(?i:&apos;)|'")
_DOUBLE_QUOTE = re.compile(r"\"|(?i:&quot;)")
_LATEX_QUOTES = [(re.compile("[\u0091\u2018\u201b\u2039]"), "`"), (re.compile("[\u0092\u2019\u203a]"), "'"),
                 (re.compile("[\u0093\u201c\u00ab]"), "``"), (re.compile("[\u0094\u201d\u00bb]"), "''")]


def _quotes(left: bool) -> Callable[[str], tuple[str | None, int]]:
    """ASCII and curly quotes to LaTeX style: `` ` (opening) and '' ' (closing)."""
    def action(text: str) -> tuple[str | None, int]:
        token = _SINGLE_QUOTE.sub("`" if left else "'", text)
        token = _DOUBLE_QUOTE.sub("``" if left else "''", token)
        for pattern, replacement in _LATEX_QUOTES:
            token = pattern.sub(replacement, token)
        return token, len(text)
    return action


def _keep_and_rescan_period(text: str) -> tuple[str | None, int]:
    """"Blvd. A" -> "Blvd." then "." (Java duplicates the period as a sentence end)."""
    return text, len(text) - 1


def _acronym_before_sentence(text: str) -> tuple[str | None, int]:
    """"U.S. The" -> "U.S." then "." (the period is scanned again); "I. The" -> "I" then "."."""
    if len(text) == 2:
        return text[0], 1
    return text, len(text) - 1


_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}


@cache
def _rules() -> tuple[_Rule, ...]:
    classes = _unicode_classes()
    alpha, digit = classes["alpha"], classes["digit"]
    letter = f"(?:[{alpha}{classes['mark']}\u00ad]|&[aeiouAEIOU](?i:acute|grave|uml);)"
    d = f"[{digit}]"
    alnum = f"[{alpha}{digit}]"
    alpha_c = f"[{alpha}]"
    space = "[ \t\u00a0\u2000-\u200a\u3000]"
    newline = "\r\n?|[\n\u2028\u2029\u000b\u000c\u0085]"
    space_nl = f"(?:{space}|{newline})"
    apos = "(?:['\u0092\u2019]|(?i:&apos;))"
    apos_etc = "(?:['`\u0092\u2019\u0091\u2018\u201b]|(?i:&apos;))"  # also found inside words
    word = f"{letter}(?:{letter}|{d})*(?:[.!?]{letter}(?:{letter}|{d})*)*"  # "ground.a" is one word
    clitic = f"{apos}(?:[msdMSD]|(?i:re|ve|ll))"                             # 's 'm 'd 're 've 'll
    nt = f"[nN]{apos_etc}[tT]"
    num = f"{d}*(?:[.:,\u00ad\u066b\u066c]{d}+)+|{d}+"                        # 3.5 1,000 12:30
    acro = r"[A-Za-z](?:\.[A-Za-z])*|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r))"
    acro2 = r"[A-Za-z](?:\.[A-Za-z])+|(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r))"
    hyphen = "[-_\u058a\u2010\u2011]"
    thing_part = f"(?:[dDoOlL]{apos_etc}{alnum})?{alnum}+"                    # o'clock d'oeuvre
    thing = f"{thing_part}(?:{hyphen}{thing_part})*"                           # t-shirt 5-year-old
    hthing = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:(?:{acro2})\.|[A-Za-z0-9\u00ad]+))+"  # U.S.-based
    thinga = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"                            # AT&T
    insentp = "[,;:\u3001]"
    file_extension = ("bat|bmp|c|class|cgi|cpp|dll|docx?|exe|gif|gz|h|html?|jar|java|jpe?g|mov|mp3|pdf|php"
                      "|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip")
    # Abbreviations that keep their period ("St." "Mr."); [X] classes are case-sensitive.
    abbrev1 = ("(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri"
               "|ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla"
               "|penn|tenn|va|vt|wisc?|wyo|inc|cos?|corp|ltd|plc|rt|bancorp|dept|bhd|assn|univ|intl|sys"
               "|tel|est|ext|sq|ft|jr|sr|bros|ed\\.d|ph\\.d|blvd|rd|esq|etc|al|seq|bldg)"
               "|[A](?i:z|rk)|[D](?i:el)|[I](?i:ll)|[L](?i:a)|[M](?i:ass|iss)|[O](?i:re)|[P](?i:a)"
               "|[T](?i:ex)|[W](?i:ash)|(?i:p)(?i:p)?(?i:t)[ye](?i:s)?")
    abbrev4 = ("(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl"
               "|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|ft|adj|adv|asst"
               "|assoc|ens|insp|mlle|mme|msgr|sfc|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph"
               "|invt|elec|natl)|[M](?i:iss)|(?i:m)[ft](?i:g)|" + acro)
    abbrev3 = "(?i:ca|figs?|prop|nos?|art|bldg|pp|op)"                        # only before a number
    name = "[A-Za-z][A-Za-z0-9_:.-]*"
    attribute = f"{name}(?: *= *(?:'[^'\r\n]*'|\"[^\"\r\n]*\"))?"  # b or b="c" (quoted)
    sgml = f"<(?:[!?][A-Za-z-][^>\r\n]*|{name}(?: +{attribute})* */?|/{name}) *>"
    sentence_starts = ("About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However"
                       "|If|In|It|Last|Many|More|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some"
                       "|Such|That|The|Their|Then|There|These|They|This|We|When|While|What|Yet|You")
    sentence_start = "|".join([f"[{w[0]}](?i:{w[1:]})" if len(w) > 1 else w
                               for w in sentence_starts.split("|")] + [sgml])
    not_email = "[^ \t\n\f\r\"<>|(){}\u00a0"  # an unclosed class: add more and "]"
    misc_symbol = ("+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387"
                   "\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b"
                   "\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017"
                   "\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e"
                   "\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20"
                   "\uff3b-\uff40\uff5b-\uff65")

    def rule(name: str, *alternatives: str, context: str | None = None,
             action: Callable[[str], tuple[str | None, int]] = _keep) -> _Rule:
        # The trailing context is a capturing lookahead: its length counts for "longest match".
        suffix = "" if context is None else f"(?=(?P<context>{context}))"
        return _Rule(name, tuple(re.compile(f"(?:{a}){suffix}") for a in alternatives), action)

    word_action = _replace(_without_soft_hyphens)
    return (
        rule("programming_language", r"(?i:c\+\+|[cf]#)"),
        # assimilations: "cannot" -> "can" "not", "gonna" -> "gon" "na", "'tis" -> "'t" "is"
        rule("assimilation3", "(?i:cannot|'twas)", action=_push_back(3)),
        rule("assimilation2", "(?i:'tis|gonna|gotta|lemme|gimme|wanna)", action=_push_back(2)),
        rule("sgml", sgml, action=_replace(_space_to_nbsp)),  # <b> </a> <a href="x">
        rule("dash", "&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", action=_replace(lambda _: "--")),
        rule("ampersand_entity", "(?i:&amp;)", action=_replace(lambda _: "&")),
        rule("entity", "&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);"),
        # words; before a clitic ("it's" -> "it" "'s") or n't ("don't" -> "do" "n't")
        rule("word_before_clitic", word, context=clitic, action=word_action),
        rule("word_before_nt", "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", context=nt, action=word_action),
        rule("word", word, action=word_action),
        rule("apostrophe_word",  # 'n' l' 'em '90s 'til ho'ohu c'mon ...
             f"{apos}(?i:n){apos}?", f"[lLdDjJ]{apos}", f"(?i:dunkin|somethin|ol){apos}", f"{apos}(?i:em)",
             f"[A-HJ-XZn]{apos_etc}{alpha_c}{{2,}}", f"{apos}[2-9]0(?i:s)", f"{apos}(?i:till?)",
             f"{alpha_c}+[aeiouyAEIOUY]{apos_etc}[aeiouA-Z]{alpha_c}*", f"{apos}(?i:cause)",
             r"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)"),
        rule("y_apostrophe", f"(?i:y){apos}", context=alpha_c),  # y'all -> y' all
        rule("url", rf"(?i:https?)://[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){{}},-]"),
        rule("likely_url", *(rf"(?:{host})(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){{}},-])?" for host in (
            r"(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}",
            r"(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu)"))),  # ",-_" is a range, as in Java
        rule("email", rf"(?:<|(?i:&lt;))?[a-zA-Z0-9]{not_email}]*@(?:{not_email}.]+\.)*{not_email}.]+(?:>|(?i:&gt;))?"),
        rule("twitter", "@[a-zA-Z_][a-zA-Z_0-9]*", f"#{letter}+"),
        rule("clitic", clitic, context="[^A-Za-z]", action=_quotes(left=False)),
        rule("nt", nt, action=_quotes(left=False)),
        rule("date", rf"{d}{{1,2}}[-/]{d}{{1,2}}[-/]{d}{{2,4}}"),
        rule("number", f"[-+]?(?:{num})", action=word_action),
        rule("sub_superscript_number",
             "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"),
        rule("fraction", rf"(?:{d}{{1,4}}[- \u00a0])?{d}{{1,4}}(?:\\?/|\u2044){d}{{1,4}}",  # 22 3/4
             action=_replace(_space_to_nbsp)),
        rule("fraction_char", "[\u00bc\u00bd\u00be\u2153-\u215e]", action=_replace(lambda t: _FRACTIONS.get(t, t))),
        rule("treebank_special", f"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\\.d\\.s|pro-|anti-"
                                 f"|s(?:&|&amp;)p-500|s(?:&|&amp;)ls|cap{apos}n|c{apos}est)",
             action=_replace(lambda t: re.sub("(?i:&amp;)", "&", t))),
        rule("slashed", r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"),  # and/or
        rule("dollar", r"[A-Z]*\$|#"),
        rule("currency", "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
             action=_replace(lambda t: _CURRENCY.get(t, t))),
        # abbreviations and acronyms: which ones keep their period
        rule("acronym_before_sentence", rf"(?:{acro})\.", context=f"{space_nl}+(?:{sentence_start}){space_nl}",
             action=_acronym_before_sentence),
        rule("abbreviation_sentence_end", rf"(?:{abbrev1})\.", context=f"{space_nl}(?:{space_nl}|[A-Z])",
             action=_keep_and_rescan_period),
        rule("abbreviation_before_two_chars", rf"(?:{abbrev1})\.", context=r"[\s\S]{2}"),  # beats "etc.A"
        rule("abbreviation", rf"(?:{abbrev1})\.", rf"(?:{abbrev4})\."),
        rule("abbreviation_no_period", abbrev4, context=space),
        rule("acronym_no_period", acro, context=space_nl),
        rule("quoted_year", f"{apos}[0-9][0-9]", context=space_nl),  # '90
        rule("file_name", rf"(?:{letter}|{d})+(?:\.(?:{letter}|{d})+)*\.(?i:{file_extension})", context=f"{space_nl}|[.?!,]"),
        rule("word_period", rf"{word}\.", context=insentp, action=word_action),  # "dog.,"
        rule("abbreviation_before_number", rf"{abbrev3}\.", context=f"{space_nl}?{d}"),  # "No. 5"
        rule("phone", rf"(?:\([0-9]{{2,3}}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{{2,4}}[- \u00a0])?[0-9]{{2,4}}[- \u00a0])"
                      rf"[0-9]{{3,4}}[- \u00a0]?[0-9]{{3,5}}",
             r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}",
             action=_replace(lambda t: _normalize_parentheses(_space_to_nbsp(t)))),
        rule("double_quote_open", r"\"|(?i:&quot;)", context="[A-Za-z0-9$]", action=_quotes(left=True)),
        rule("double_quote", r"\"|(?i:&quot;)", action=_quotes(left=False)),
        rule("delete", "\u007f", action=_drop),
        # brackets and punctuation
        rule("less_than", "<|(?i:&lt;)", action=_replace(lambda _: "<")),
        rule("greater_than", ">|(?i:&gt;)", action=_replace(lambda _: ">")),
        rule("smiley", r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]", context="[^A-Za-z0-9]",  # :-) ;p
             action=_replace(_normalize_parentheses)),
        rule("asian_smiley", r"[-^x=~<>']_[-^x=~<>']", r"\([-^x=~<>'][_.]?[-^x=~<>']\)",  # ^_^ (-.-)
             action=_replace(_normalize_parentheses)),
        rule("bracket", r"[\[\]{}()]", action=_replace(lambda t: _BRACKETS[t])),
        rule("hyphens", "-+", action=_replace(lambda t: "--" if 3 <= len(t) <= 4 else t)),
        rule("ellipsis", "\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", action=_replace(lambda _: "...")),
        rule("marks", "@+|#+|_+", r"\*+|(?:\\\*){1,3}", insentp, "[?!]+",
             "[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002=/]"),
        rule("hyphenated_period", rf"(?:{hthing})\.", context=insentp, action=word_action),
        rule("hyphenated", hthing, action=word_action),            # 5.5-inch U.S.-based
        rule("thing_period", rf"(?:{thing})\.", context=insentp),
        rule("thing", thing),                                       # o'clock t-shirt 2x4
        rule("caps_ampersand_period", rf"(?:{thinga})\.", context=insentp,
             action=_replace(lambda t: re.sub("(?i:&amp;)", "&", t))),
        rule("caps_ampersand", thinga, action=_replace(lambda t: re.sub("(?i:&amp;)", "&", t))),
        rule("open_quote", "'", context="[A-Za-z][^ \t\n\r\u00a0]", action=_quotes(left=True)),  # 'bc
        rule("clitic_anywhere", clitic, action=_quotes(left=False)),
        rule("quotes", apos, "''", "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094"
                                   "\u201e\u201f\u2039\u203a\u00ab\u00bb]{1,2}", action=_quotes(left=False)),
        rule("duck_feet", "<<|>>"),
        rule("symbol", f"[{misc_symbol}]"),
        rule("space", f"\u0000|{space}+|[\u200b\u200e\u200f\ufeff]|(?i:&nbsp;)", action=_drop),
        rule("newline", newline, action=lambda text: (_NEWLINE, len(text))),
    )


_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_NEWLINE = "\n"  # marks a line break in the scanner's output (never a token)
# A lowercase-or-capitalised plain word before a space or the end: no other rule can do better.
_PLAIN_WORD = re.compile(r"[A-Za-z]+(?=[ \n]|\Z)")
_ASSIMILATIONS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _lex(text: str) -> list[list[str]]:
    """Scan ``text`` like the JFlex lexer; one token list per line (line breaks kept apart)."""
    rules = _rules()
    lines: list[list[str]] = [[]]
    position, end = 0, len(text)
    while position < end:
        plain = _PLAIN_WORD.match(text, position)
        if plain and plain.group().lower() not in _ASSIMILATIONS:
            lines[-1].append(plain.group())
            position = plain.end()
            continue
        best_rule, best_text, best_length = None, "", 0
        for rule in rules:
            for pattern in rule.patterns:
                match = pattern.match(text, position)
                if match is None:
                    continue
                length = (match.end("context") if pattern.groups else match.end()) - position
                if length > best_length:
                    best_rule, best_text, best_length = rule, match.group(), length
        if best_rule is None:  # untokenizable character: Java logs a warning and deletes it
            position += 1
            continue
        token, consumed = best_rule.action(best_text)
        if token == _NEWLINE:
            lines.append([])
        elif token is not None:
            lines[-1].append(token)
        position += consumed
    return lines

