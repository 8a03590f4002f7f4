from __future__ import annotations

import pytest

from rizzearch.data.jsonl import read_jsonl
from rizzearch.errors import DataError


def test_rows_with_line_numbers_skipping_blank_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"a": 1}\n\n  \n{"b": 2}\n', encoding="utf-8")
    assert list(read_jsonl(f)) == [(1, {"a": 1}), (4, {"b": 2})]
    assert list(read_jsonl(f, '{"c": 3}')) == [(1, {"c": 3})]  # contents given: the file is only named


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"a": 1}\n{"a": \n', r"a.jsonl:2: not valid JSON \(column"),
        ('{"a": 1}\n[1, 2]\n', r"a.jsonl:2: expected a JSON object, got list"),
        (b'{"a": "\xff"}\n', r"a.jsonl: not UTF-8 text \(byte 7\)"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, content, match):
    f = tmp_path / "a.jsonl"
    (f.write_bytes if isinstance(content, bytes) else f.write_text)(content)
    with pytest.raises(DataError, match=match):
        list(read_jsonl(f))
