"""Reading raw corpora: sentence splitting, Wikipedia markup, the three input formats (no Ray)."""

from __future__ import annotations

import bz2
import json

import pytest

from data.corpus import (CorpusError, detect_format, document_sentences, iter_raw_documents,
                         list_input_files, resolve_format)
from data.sentences import split_sentences
from data.wikitext import DumpError, iter_dump_articles, wikitext_to_paragraphs


def test_split_sentences_by_the_documented_rule():
    text = ("Dr. Ada Byron met J. R. Tolkien in St. Ives on Jan. 5. They talked! "
            "Was it 1850? \"Yes,\" he said. (It was.) 3 people came. e.g. this is one. "
            "the end")
    assert split_sentences(text) == [
        "Dr. Ada Byron met J. R. Tolkien in St. Ives on Jan. 5.",
        "They talked!",
        "Was it 1850?",
        "\"Yes,\" he said.",
        "(It was.)",
        "3 people came. e.g. this is one. the end",  # lower-case starts are not cut (documented)
    ]
    assert split_sentences("   ") == []
    assert split_sentences("One line\nwith a break. Two.") == ["One line with a break.", "Two."]


WIKITEXT = """{{Infobox person|name=TEMPLATEWORD|birth=1815}}
'''Ada Lovelace''' was an English [[mathematician]] and [[Writer|writer]].<ref>{{cite web|title=REFWORD}}</ref> She worked on the [[Analytical Engine]].

== HEADINGWORD ==
{| class="wikitable"
! Year !! Event
|-
| 1815 || TABLEWORD
|}
Her father was [[Lord Byron]]. See [http://example.com the site] and http://bare.example.com here.
[[File:Ada.jpg|thumb|FILEWORD caption]]
[[Category:CATEGORYWORD]]
[[de:INTERWIKIWORD]]
<!-- COMMENTWORD -->
* LISTWORD item.
# LISTWORD numbered.
: INDENTWORD.
She died in 1852 &ndash; aged 36.<gallery>
File:X.jpg|GALLERYWORD
</gallery> __NOTOC__
<math>MATHWORD</math>
"""


def test_wikitext_keeps_text_and_drops_markup():
    paragraphs = wikitext_to_paragraphs(WIKITEXT)
    assert paragraphs == [
        "Ada Lovelace was an English mathematician and writer. She worked on the Analytical "
        "Engine.",
        "Her father was Lord Byron. See the site and here.",
        "She died in 1852 \u2013 aged 36.",
    ]
    text = " ".join(paragraphs)
    for dropped in ("TEMPLATEWORD", "REFWORD", "HEADINGWORD", "TABLEWORD", "FILEWORD",
                    "CATEGORYWORD", "INTERWIKIWORD", "COMMENTWORD", "LISTWORD", "INDENTWORD",
                    "GALLERYWORD", "MATHWORD", "NOTOC", "http"):
        assert dropped not in text


def page_xml(title: str, ns: int, text: str, redirect: str | None = None) -> str:
    esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    red = f'<redirect title="{redirect}" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>{abs(hash(title)) % 10**6}</id>{red}"
            "<revision><id>1</id><timestamp>2020-01-01T00:00:00Z</timestamp>"
            "<contributor><username>u</username><id>1</id></contributor>"
            "<model>wikitext</model><format>text/x-wiki</format>"
            f'<text bytes="{len(text)}" xml:space="preserve">{esc}</text>'
            "<sha1>x</sha1></revision></page>\n")


def write_dump(path, pages: list[str]) -> None:
    """A Wikipedia export file (the pages-articles layout) with ``pages``."""
    head = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" '
            'xml:lang="en"><siteinfo><sitename>Wikipedia</sitename><dbname>enwiki</dbname>'
            '<base>https://en.wikipedia.org/wiki/Main_Page</base><generator>MediaWiki</generator>'
            '<case>first-letter</case><namespaces><namespace key="0" case="first-letter" />'
            '<namespace key="1" case="first-letter">Talk</namespace>'
            '<namespace key="10" case="first-letter">Template</namespace></namespaces>'
            '</siteinfo>\n')
    data = (head + "".join(pages) + "</mediawiki>\n").encode()
    if str(path).endswith(".bz2"):
        data = bz2.compress(data)
    with open(path, "wb") as f:
        f.write(data)


def test_dump_yields_only_main_namespace_articles(tmp_path):
    pages = [page_xml("Ada", 0, "Ada was a writer. She died."),
             page_xml("Talk:Ada", 1, "TALKWORD here."),
             page_xml("Template:Box", 10, "TEMPLATEPAGEWORD"),
             page_xml("Lovelace", 0, "#REDIRECT [[Ada]]", redirect="Ada"),
             page_xml("Byron", 0, "#redirect [[Ada]]"),  # a redirect without the element
             page_xml("Babbage", 0, "Babbage built engines.")]
    for name in ("dump.xml", "dump.xml.bz2"):
        write_dump(tmp_path / name, pages)
        articles = list(iter_dump_articles(tmp_path / name))
        assert [t for t, _ in articles] == ["Ada", "Babbage"]
        assert detect_format(str(tmp_path / name)) == "wikixml"


def test_dump_that_is_not_xml_names_the_file(tmp_path):
    bad = tmp_path / "broken.xml"
    bad.write_text("<mediawiki><page><title>x</title></mediawiki")
    with pytest.raises(DumpError, match="broken.xml"):
        list(iter_dump_articles(bad))


def test_lines_format_documents_and_file_boundaries(tmp_path):
    (tmp_path / "a.txt").write_text("s1\ns2\n\n\n  \ns3\n")
    (tmp_path / "b.txt").write_text("s4\n\ns5\ns6")
    files = list_input_files([tmp_path])
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.txt", "b.txt"]
    docs = list(iter_raw_documents(files, resolve_format("auto", files)))
    assert [document_sentences("lines", d) for d in docs] == [
        ["s1", "s2"], ["s3"], ["s4"], ["s5", "s6"]]


def test_wikiextractor_format(tmp_path):
    path = tmp_path / "wiki_00"  # WikiExtractor's names have no extension: sniffed by content
    rows = [{"id": "1", "title": "Ada", "text": "Ada\nAda was born. She wrote.\nShe died."},
            {"id": "2", "title": "Empty", "text": ""},
            {"id": "3", "title": "Bab", "text": "Babbage built it. It worked."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert detect_format(str(path)) == "wikiextractor"
    docs = [document_sentences("wikiextractor", d)
            for d in iter_raw_documents([str(path)], "wikiextractor")]
    assert [d for d in docs if d] == [["Ada was born.", "She wrote.", "She died."],
                                      ["Babbage built it.", "It worked."]]
    path.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(CorpusError, match=r"wiki_00:2: not a JSON object"):
        list(iter_raw_documents([str(path)], "wikiextractor"))


def test_input_errors_name_the_path(tmp_path):
    with pytest.raises(CorpusError, match="nope.txt: no such input"):
        list_input_files([tmp_path / "nope.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="input directory has no files"):
        list_input_files([tmp_path / "empty"])
    with pytest.raises(CorpusError, match="unknown input format 'pdf'.*lines, wikiextractor, "
                                          "wikixml"):
        resolve_format("pdf", [])
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text("{}\n")
    with pytest.raises(CorpusError, match="different formats"):
        resolve_format("auto", [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
