"""Raw pre-training corpora: find the input files, read documents from them in order.

Three input formats (``--input_format``):

``lines``
    The corpus of Google's ``create_pretraining_data.py`` and of the original PyTorch BERT
    ``--train_path ... --on_memory`` scripts: one sentence per line, a blank line between
    documents (a file's end also ends a document).
``wikiextractor``
    WikiExtractor ``--json`` output: one JSON object per line with ``"text"`` (and ``"id"``,
    ``"title"``); the text's lines are paragraphs, split into sentences by
    :func:`data.sentences.split_sentences`. A first line equal to the title is dropped.
``wikixml``
    A Wikipedia ``pages-articles*.xml`` / ``.xml.bz2`` dump, streamed by
    :func:`data.wikitext.iter_dump_articles`; see :mod:`data.wikitext` for what is dropped.

``auto`` picks by file name (``.xml``/``.xml.bz2``: wikixml; ``.json``/``.jsonl``: wikiextractor;
``.txt``: lines), else by the first non-blank character of the file (``<``: wikixml, ``{``:
wikiextractor, anything else: lines). Any file may be bz2-compressed (``.bz2``).

Reading is split in two so that the expensive part runs in parallel: :func:`iter_raw_documents`
(on the driver, sequential, streaming) yields each document's raw payload, and
:func:`document_sentences` (in the preparation tasks) turns a payload into sentences.
"""

from __future__ import annotations

import bz2
import json
import os
from typing import Iterator, Sequence, Union

from data.sentences import split_sentences
from data.wikitext import iter_dump_articles, wikitext_to_paragraphs

INPUT_FORMATS = ("lines", "wikiextractor", "wikixml")

#: What a document is between reading and sentence splitting: the sentences themselves (lines),
#: or ``(title, text)`` (wikiextractor: plain text; wikixml: wikitext).
RawDocument = Union[tuple[str, ...], tuple[str, str]]


class CorpusError(ValueError):
    """An input path or file cannot be used; the message names it and says what to do."""


def _open_text(path: str):
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _format_from_name(path: str) -> str | None:
    name = path[:-4] if path.endswith(".bz2") else path
    if name.endswith(".xml"):
        return "wikixml"
    if name.endswith((".json", ".jsonl")):
        return "wikiextractor"
    if name.endswith(".txt"):
        return "lines"
    return None


def _format_from_content(path: str) -> str:
    try:
        with _open_text(path) as f:
            for line in f:
                stripped = line.lstrip()
                if stripped:
                    return {"<": "wikixml", "{": "wikiextractor"}.get(stripped[0], "lines")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: cannot read input file: {e}") from None
    return "lines"  # an empty file: any reader gives no documents


def detect_format(path: str) -> str:
    """The input format of one file by the ``auto`` rule of this module's docstring."""
    return _format_from_name(path) or _format_from_content(path)


def list_input_files(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Input files, in order: each file as given, each directory's files recursively, sorted.

    Hidden files and files starting with ``_`` (``_SUCCESS`` markers) are skipped inside
    directories. Raises :class:`CorpusError` for a missing or unreadable path or an empty
    directory.
    """
    if not inputs:
        raise CorpusError("no input given; pass --input with corpus files or directories")
    files: list[str] = []
    for given in inputs:
        path = os.fspath(given)
        if not os.path.exists(path):
            raise CorpusError(f"{path}: no such input file or directory (check --input)")
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
                found.extend(os.path.join(root, n) for n in sorted(names)
                             if not n.startswith((".", "_")))
            if not found:
                raise CorpusError(f"{path}: input directory has no files")
            files.extend(found)
        else:
            files.append(path)
    for path in files:
        if not os.access(path, os.R_OK):
            raise CorpusError(f"{path}: input file is not readable (check its permissions)")
    return files


def resolve_format(input_format: str, files: Sequence[str]) -> str:
    """The one format of all ``files``: ``input_format`` itself, or detected when ``auto``."""
    if input_format != "auto" and input_format not in INPUT_FORMATS:
        raise CorpusError(f"unknown input format {input_format!r}; use one of "
                          f"{', '.join(INPUT_FORMATS)} or auto")
    if input_format != "auto":
        return input_format
    formats = {path: detect_format(path) for path in files}
    kinds = sorted(set(formats.values()))
    if len(kinds) > 1:
        examples = ", ".join(f"{next(p for p, k in formats.items() if k == kind)} ({kind})"
                             for kind in kinds)
        raise CorpusError(f"input files are of different formats: {examples}; give one format "
                          "per run, or pass --input_format to read them all one way")
    return kinds[0]


def _iter_lines_documents(path: str) -> Iterator[RawDocument]:
    sentences: list[str] = []
    with _open_text(path) as f:
        for line in f:
            line = line.strip()
            if line:
                sentences.append(line)
            elif sentences:
                yield tuple(sentences)
                sentences = []
    if sentences:
        yield tuple(sentences)


def _iter_wikiextractor_documents(path: str) -> Iterator[RawDocument]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not a JSON object ({e.msg}); WikiExtractor "
                                  "--json output has one {\"id\", \"title\", \"text\"} object "
                                  "per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CorpusError(f"{path}:{lineno}: JSON object has no \"text\" string; "
                                  "expected WikiExtractor --json output")
            title = obj.get("title")
            yield (str(title) if title is not None else "", obj["text"])


def iter_raw_documents(files: Sequence[str], input_format: str) -> Iterator[RawDocument]:
    """Each document's raw payload, file after file, in file order, streamed."""
    if input_format not in INPUT_FORMATS:
        raise CorpusError(f"unknown input format {input_format!r}; use one of "
                          f"{', '.join(INPUT_FORMATS)}")
    for path in files:
        try:
            if input_format == "lines":
                yield from _iter_lines_documents(path)
            elif input_format == "wikiextractor":
                yield from _iter_wikiextractor_documents(path)
            else:
                yield from iter_dump_articles(path)
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path}: input is not UTF-8 text ({e.reason})") from None
        except (OSError, EOFError) as e:
            raise CorpusError(f"{path}: cannot read input file: {e}") from None


def document_sentences(input_format: str, raw: RawDocument) -> list[str]:
    """The sentences of one raw document (see :func:`iter_raw_documents`)."""
    if input_format == "lines":
        return list(raw)
    title, text = raw
    if input_format == "wikixml":
        paragraphs = wikitext_to_paragraphs(text)
    else:
        paragraphs = [p for p in (" ".join(line.split()) for line in text.split("\n")) if p]
        if paragraphs and title and paragraphs[0] == " ".join(title.split()):
            paragraphs = paragraphs[1:]
    return [s for p in paragraphs for s in split_sentences(p)]
