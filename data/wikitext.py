"""Wikipedia XML dumps: stream main-namespace articles and turn their wikitext into paragraphs.

The dump (``pages-articles*.xml`` or ``.xml.bz2``) is read page by page with ``mwxml`` (an
iterparse-based reader that never holds the dump in memory); the markup is parsed with
``mwparserfromhell``. What is kept is what BERT was pre-trained on: the text passages of articles.

Dropped: pages outside the main namespace (talk, user, template, category ... pages), redirects,
templates (infoboxes, citations, ``{{lang|...}}``), tables, references, galleries, math and code,
comments, section headings, list and indented lines, file/image/category and interlanguage links,
bare external links, and magic words such as ``__TOC__``. Kept: the text of bold/italic and
other inline tags, the shown text of article links (``[[Writer|writer]]`` gives "writer") and of
titled external links, and HTML entities as characters.
"""

from __future__ import annotations

import bz2
import os
import re
from typing import Iterator

import mwparserfromhell
import mwxml
from mwxml.errors import MalformedXML
from mwparserfromhell.nodes import (Comment, ExternalLink, Heading, HTMLEntity, Tag, Template,
                                    Text, Wikilink)
from mwparserfromhell.wikicode import Wikicode

#: Tags whose whole content is dropped (not running text).
DROPPED_TAGS = frozenset("""
table ref references gallery math chem ce code pre source syntaxhighlight timeline imagemap score
graph mapframe maplink hiero templatedata templatestyles inputbox categorytree noinclude
""".split())
#: Namespace prefixes of links that are not running text (file, category, interwiki ...).
DROPPED_LINK_PREFIXES = ("file", "image", "media", "category", "wikipedia", "wp", "wikt",
                         "wiktionary", "template", "help", "portal", "special", "user", "s",
                         "commons", "q", "n", "v", "b", "voy", "species", "d", "meta", "mw")
_LIST_MARKUP = ("*", "#", ";", ":")
_DROP_LINE = "\x00"  # marks a list or indented line, whose text is dropped
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_LANGUAGE_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z]+)*$")
_REDIRECT = re.compile(r"^\s*#redirect", re.IGNORECASE)


def _link_is_text(link: Wikilink) -> bool:
    title = str(link.title).strip().lstrip(":")
    if ":" not in title:
        return True
    prefix = title.split(":", 1)[0].strip().lower()
    return not (prefix in DROPPED_LINK_PREFIXES or _LANGUAGE_PREFIX.match(prefix))


def _plain(code: Wikicode) -> str:
    out: list[str] = []
    for node in code.nodes:
        if isinstance(node, Text):
            out.append(str(node.value))
        elif isinstance(node, (Template, Comment)):
            continue
        elif isinstance(node, Heading):
            out.append("\n" + _DROP_LINE)  # the heading's line goes; its newline stays in Text
        elif isinstance(node, Tag):
            tag = str(node.tag).lower()
            if node.wiki_markup in _LIST_MARKUP or tag in ("li", "dt", "dd"):
                out.append(_DROP_LINE)
            elif tag in DROPPED_TAGS:
                continue
            elif tag == "br":
                out.append(" ")
            elif node.contents is not None:
                out.append(_plain(node.contents))
        elif isinstance(node, Wikilink):
            if _link_is_text(node):
                out.append(_plain(node.text) if node.text is not None else str(node.title))
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                out.append(_plain(node.title))
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        else:
            out.append(str(node.__strip__(normalize=True, collapse=True) or ""))
    return "".join(out)


def wikitext_to_paragraphs(wikitext: str) -> list[str]:
    """The running-text paragraphs of an article's wikitext (see the module docstring)."""
    text = _MAGIC_WORD.sub("", _plain(mwparserfromhell.parse(wikitext)))
    paragraphs = []
    for line in text.split("\n"):
        if line.startswith(_DROP_LINE):
            continue
        line = " ".join(line.replace(_DROP_LINE, " ").split())
        if any(c.isalpha() for c in line):
            paragraphs.append(line)
    return paragraphs


class DumpError(ValueError):
    """A Wikipedia dump could not be read; the message names the file."""


def iter_dump_articles(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of each main-namespace, non-redirect page of a dump, streamed.

    ``path`` is a ``pages-articles*.xml`` or ``.xml.bz2`` file; the last revision of each page
    is used (``pages-articles`` dumps have one).
    """
    path = os.fspath(path)
    opener = bz2.open if path.endswith(".bz2") else open
    with opener(path, "rb") as f:
        try:
            dump = mwxml.Dump.from_file(f)
            for page in dump:
                text = None
                for revision in page:
                    text = revision.text
                if page.namespace != 0 or page.redirect or text is None:
                    continue
                if _REDIRECT.match(text):
                    continue
                yield str(page.title), text
        except (MalformedXML, SyntaxError, ValueError, KeyError, EOFError, OSError) as e:
            # xml.etree.ElementTree.ParseError is a SyntaxError; bz2 raises OSError/EOFError.
            raise DumpError(f"{path}: cannot read as a Wikipedia XML dump: "
                            f"{type(e).__name__}: {e}") from None
