"""Rule-based English sentence splitting with character spans (offline, linear time), for PG19 chunking.

The reference split PG19 with nltk's punkt model, which must be downloaded at run time. pysbd ships its rules in
its wheel, but measured on book-length text it is unusable here: its run time grows quadratically (0.24 s for
31 k characters, 42 s for 480 k; a PG19 book is ~400 k), its decisions are not local (an unbalanced quote or an
`_italic_` marker far back suppresses every split up to the next one, so one "sentence" can swallow a page),
and it splits "the 4th inst., and" before the comma. This module is a small documented rule set instead: one
regular-expression pass, decisions that look only at the neighbouring words, and offsets into the input text.

A sentence ends at a run of terminal punctuation (`.`, `?`, `!`, `…`, any mix, so "...", "?!" and "!!" are one
end) plus any closing marks that follow it (`"` `'` `”` `’` `)` `]` `_`), when all of these hold:

1. whitespace follows (so "3.14", "p.m.," and "inst.," never end a sentence);
2. after the whitespace and any opening marks (`"` `'` `“` `‘` `(` `[` `_`) comes an upper-case letter: so
   `"Stop!" he cried`, "Wait... what?" and "e.g. hammers" do not end a sentence, and "No. 5" does not either
   (a digit does not start a sentence);
3. if the punctuation is a single "." with no closing mark, the word before it is neither a title or name
   abbreviation that precedes a name (Mr., Mrs., Dr., St., Capt., Rev., Wm., ...; see NON_FINAL_ABBREVIATIONS)
   or "e.g."/"i.e."/"viz."/"cf.", nor a single upper-case letter (initials: "J. R. R. Tolkien").

Known limits, accepted for chunking: a sentence that really ends with an initial or a listed abbreviation
("...at No. 5 Baker St. They left") is joined to the next one; "the U.S. Army" is split after "U.S."; quoted
speech is split inside the quotes like punkt does (`"Nothing, sir. I want..."` gives two sentences).
"""

import re

# Lower-cased, without the final period. Words that precede a name and essentially never end a sentence.
NON_FINAL_ABBREVIATIONS = frozenset(
    """
    mr mrs ms messrs mme mlle dr st capt col gen lt sgt maj adm cmdr rev hon prof gov sen fr
    wm jas chas thos geo jno benj robt edw richd saml danl
    e.g i.e viz cf vs
    """.split()
)

_CLOSING_MARKS = "\"'”’)]_"
_OPENING_MARKS = "\"'“‘([_"
# A run of terminal punctuation, then closing marks, then (lookahead) whitespace.
_CANDIDATE_END = re.compile(r"[.?!…]+[" + re.escape(_CLOSING_MARKS) + r"]*(?=\s)")
_WORD_BEFORE = re.compile(r"(\S+)$")


def _starts_like_a_sentence(text, pos):
    """True if text[pos:] (pos at a non-space) is optional opening marks then an upper-case letter."""
    while pos < len(text) and text[pos] in _OPENING_MARKS:
        pos += 1
    return pos < len(text) and text[pos].isupper()


def _is_non_final_word(word):
    """`word` is the text before a single final period, e.g. "Mr", "(e.g", "J"."""
    word = word.lstrip(_OPENING_MARKS)
    if len(word) == 1 and word.isupper():
        return True  # an initial
    return word.lower() in NON_FINAL_ABBREVIATIONS


def _next_non_space(text, pos):
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def split_sentences(text):
    """Sentence spans of `text` as a list of (start, end) character offsets, end exclusive.

    Spans are in order, do not overlap, contain no leading or trailing whitespace, and only whitespace lies
    between consecutive spans (so they cover all of `text` but its whitespace). An empty or all-whitespace
    text has no sentences.
    """
    start = _next_non_space(text, 0)
    if start == len(text):
        return []
    spans = []
    for match in _CANDIDATE_END.finditer(text, start):
        end = match.end()
        if end <= start:  # cannot happen with spans built in order; kept as a guard against regressions
            continue
        next_start = _next_non_space(text, end)
        if next_start == len(text) or not _starts_like_a_sentence(text, next_start):
            continue
        if match.group() == ".":
            word = _WORD_BEFORE.search(text, start, match.start())
            if word is not None and _is_non_final_word(word.group(1)):
                continue
        spans.append((start, end))
        start = next_start
    end = len(text)
    while text[end - 1].isspace():
        end -= 1
    spans.append((start, end))
    return spans


def sentences(text):
    """The sentence strings of `text` (convenience for inspection and tests)."""
    return [text[s:e] for s, e in split_sentences(text)]
