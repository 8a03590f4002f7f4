"""A user's own documents as passages: a folder of .txt / .md / .html files, or a JSONL of
``{"id", "title", "text", "citation"?}``, chunked with the bundled corpus's passage scheme
(``legal.corpus.chunk_text``: sentences packed into chunks of about ``chunk_chars`` characters).

Each document becomes passages ``doc/<id>/c00``, ``doc/<id>/c01``, ... with source ``documents``; the
reference a lawyer would cite is the document's ``citation`` (JSONL), else its title. Those references are
what the audit checks the existence of cited authorities against (``legal.citations.build_authorities`` reads
case and statute citations out of them).

Bad input fails early, naming the file (and line): an empty document, a binary or non-UTF-8 file, a JSONL line
that is not an object or has no ``text``, duplicate ids, a folder with no documents.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

from rizzearch.errors import DataError
from rizzearch.legal.corpus import Passage, chunk_text
from rizzearch.legal.text import normalize_space

SUFFIXES = (".txt", ".md", ".html", ".htm")


class _HTMLText(HTMLParser):
    """Visible text of an HTML page (script and style dropped) and its <title>."""

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in ("p", "br", "div", "li", "h1", "h2", "h3", "h4", "tr", "section"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\0" in raw:
        raise DataError(f"{path}: binary file (NUL bytes), not a text document")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); convert it or leave it out") from e


def _doc_id(name: str) -> str:
    """A stable, passage-id-safe document id (lower case, ``[a-z0-9_/-]``)."""
    return re.sub(r"[^a-z0-9_/-]+", "-", name.lower()).strip("-/") or "doc"


def _file_document(path: Path, root: Path) -> dict:
    text = _read_text(path)
    title = path.stem.replace("_", " ")
    if path.suffix.lower() in (".html", ".htm"):
        parser = _HTMLText()
        parser.feed(text)
        text, title = "".join(parser.parts), normalize_space(parser.title) or title
    elif path.suffix.lower() == ".md":
        m = re.search(r"^#\s+(.+)$", text, re.MULTILINE)
        title = m.group(1).strip() if m else title
    if not text.strip():
        raise DataError(f"{path}: empty document")
    return {"id": _doc_id(str(path.relative_to(root).with_suffix(""))), "title": title, "text": text, "citation": None}


def _jsonl_documents(path: Path) -> list[dict]:
    out = []
    text = _read_text(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise DataError(f"{where}: a document must be a JSON object with id, title, text")
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{where}: document without 'text'")
        if not isinstance(row.get("id"), (str, int)) or str(row.get("id")).strip() == "":
            raise DataError(f"{where}: document without 'id'")
        cit = row.get("citation")
        if cit is not None and not isinstance(cit, str):
            raise DataError(f"{where}: 'citation' must be a string")
        out.append({"id": _doc_id(str(row["id"])), "title": str(row.get("title") or row["id"]), "text": row["text"],
                    "citation": cit, "where": where})
    if not out:
        raise DataError(f"{path}: no documents")
    return out


def load_documents(path: str | Path, chunk_chars: int = 700) -> list[Passage]:
    """Passages of the documents at ``path`` (a folder or a ``.jsonl`` file), in a fixed order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {'/'.join(SUFFIXES)} documents in this folder")
        docs = [_file_document(f, path) for f in files]
    elif path.is_file():
        docs = _jsonl_documents(path)
    else:
        raise DataError(f"{path}: no such file or folder")
    seen: dict[str, str] = {}
    out = []
    for d in docs:
        if d["id"] in seen:
            raise DataError(f"{d.get('where', path)}: duplicate document id {d['id']!r}")
        seen[d["id"]] = d["title"]
        doc = f"doc/{d['id']}"
        ref = d["citation"] or d["title"]
        meta = {"doc": doc, "title": d["title"], "citation": d["citation"]}
        for i, chunk in enumerate(chunk_text(normalize_space(d["text"]), chunk_chars)):
            out.append(Passage(f"{doc}/c{i:02d}", "documents", ref, d["title"], chunk, dict(meta)))
    return out
