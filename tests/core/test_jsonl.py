"""stepprobe.jsonl: the one writer and reader of resumable JSON Lines artifacts (traces,
run results, bench cells)."""

from __future__ import annotations

import json

import pytest

from stepprobe import jsonl
from stepprobe.errors import ArtifactMismatch, StepprobeError

KIND, VERSION, WHAT = "stepprobe-test", 3, "test file"
HEADER = {"kind": KIND, "schema_version": VERSION, "config": {"x": 1}}


def _records(path):
    header, lines = jsonl.read(path, KIND, VERSION, WHAT)
    return header, [rec for _, rec in lines]


def test_create_then_append_after_a_torn_tail_keeps_every_record(tmp_path):
    path = tmp_path / "a.jsonl"
    with jsonl.create(path, HEADER) as w:
        w.write({"id": "a"})
    with open(path, "a", encoding="utf-8") as fh:  # a writer killed mid-line
        fh.write('{"id": "b", "tr')
    header, recs = _records(path)
    assert header == HEADER and recs == [{"id": "a"}]  # the torn line is ignored by readers
    with jsonl.append(path) as w:
        w.write({"id": "c"})
    assert path.read_text(encoding="utf-8").splitlines()[1:] == ['{"id": "a"}', '{"id": "c"}']
    assert _records(path)[1] == [{"id": "a"}, {"id": "c"}]
    before = path.read_bytes()
    jsonl.truncate_torn_tail(path)  # a complete file is left as it is
    assert path.read_bytes() == before


def test_create_replaces_and_reader_numbers_lines_skipping_blank_ones(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("old\n")
    with jsonl.create(path, HEADER) as w:
        w.write([1])
        w._fh.write("\n")
        w.write([2])
    header, lines = jsonl.read(path, KIND, VERSION, WHAT)
    assert list(lines) == [(2, [1]), (4, [2])]


def test_a_corrupt_complete_line_is_refused_by_number_not_skipped_with_what_follows(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(HEADER) + '\n{"id": "a"}\n{"id": "b", "tr{"id": "c"}\n{"id": "d"}\n')
    with pytest.raises(StepprobeError, match=r"a.jsonl:3: corrupt test file line"):
        _records(path)


@pytest.mark.parametrize("text, match", [
    ("", "no complete header line; not a test file"),
    ('{"kind": "stepprobe-test", "schema_version": 3}', "no complete header line"),  # torn header
    ("[1]\n", "first line is not a header"),
    ('{"kind": "stepprobe-other", "schema_version": 3}\n', "not a stepprobe test file"),
    ('{"kind": "stepprobe-test", "schema_version": 2}\n', "schema version 2, this stepprobe reads version 3"),
])
def test_header_checks(tmp_path, text, match):
    path = tmp_path / "a.jsonl"
    path.write_text(text)
    with pytest.raises(ArtifactMismatch, match=match):
        jsonl.read_header(path, KIND, VERSION, WHAT)


def test_missing_file_names_the_artifact(tmp_path):
    with pytest.raises(StepprobeError, match="test file not found"):
        jsonl.read(tmp_path / "nope.jsonl", KIND, VERSION, WHAT)
