"""Sentence splitting for running text (WikiExtractor output, Wikipedia articles).

A documented simple rule rather than a model, so that preparation needs nothing downloaded and
gives the same sentences on every machine:

A paragraph is cut after a ``.``, ``!`` or ``?`` (a run of them, plus any closing quotes or
brackets right after) when whitespace follows and the next non-space character starts a sentence
(an upper-case letter, a digit, or an opening quote or bracket). A ``.`` does not end a sentence
when the word before it is a single letter (an initial: "J. R. R. Tolkien") or a known
abbreviation (:data:`ABBREVIATIONS`: "Dr.", "St.", "e.g.", "Jan.", ...).

What it gets wrong, knowingly: an abbreviation at the true end of a sentence joins two sentences;
a lower-case sentence start ("iPhone ...") is not cut. BERT's next-sentence pairs are built from
runs of sentences, so such rare joins only make a segment longer.
"""

from __future__ import annotations

import re

#: Words (lower-case, without the final ".") after which a "." is not a sentence end.
ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt ft vs etc e.g i.e cf al no nos vol vols fig figs pp ed eds
jan feb mar apr jun jul aug sep sept oct nov dec inc ltd co corp bros gen col lt sgt capt cmdr
adm gov sen rep rev hon pres u.s u.k u.n approx ca est dept univ assn ave blvd rd
""".split())

# A candidate end: terminal punctuation, optional closers, then whitespace, then a sentence start.
_END = re.compile(r"""([.!?]+)(["'”’)\]]*)(\s+)(?=["'“‘(\[]?[A-Z0-9À-ÖØ-Þ])""")
_WORD_BEFORE = re.compile(r"""(\S+)$""")


def split_sentences(paragraph: str) -> list[str]:
    """The sentences of one paragraph by the rule in this module's docstring, whitespace-trimmed."""
    text = " ".join(paragraph.split())
    if not text:
        return []
    sentences = []
    start = 0
    for m in _END.finditer(text):
        if m.group(1) == ".":
            before = _WORD_BEFORE.search(text, start, m.start(1))
            word = before.group(1).lstrip("\"'“‘([").lower() if before else ""
            if len(word) == 1 and word.isalpha():
                continue  # an initial
            if word in ABBREVIATIONS:
                continue
        end = m.end(2)
        sentences.append(text[start:end])
        start = m.end(3)
    if start < len(text):
        sentences.append(text[start:])
    return [s for s in (s.strip() for s in sentences) if s]
