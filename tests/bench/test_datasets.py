"""Dataset loaders: shipped files, the embedded task, user JSONL, hub datasets, errors."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from bench.datasets import DATA_DIR, DatasetError, Example, load_dataset

SHIPPED = [("gsm8k", 1319, "gsm8k"), ("math500", 500, "math"), ("aime24", 30, "aime"),
           ("aime25", 30, "aime")]


@pytest.mark.parametrize(("name", "count", "kind"), SHIPPED)
def test_shipped_files(name: str, count: int, kind: str) -> None:
    examples = load_dataset(name)
    assert len(examples) == count
    assert len({e.id for e in examples}) == count
    for example in examples:
        assert example.kind == kind
        assert example.id.strip() and example.problem.strip()
        assert example.answer is not None and example.answer.strip()
        assert "solution" in example.metadata
    assert examples[0].id.startswith(name if name != "gsm8k" else "gsm8k-test")


def test_shipped_field_details() -> None:
    assert load_dataset("gsm8k", limit=1)[0].answer == "18"
    math500 = load_dataset("math500", limit=3)
    assert len(math500) == 3
    assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert {"subject", "level", "unique_id"} <= set(math500[0].metadata)
    assert "025" in {e.answer for e in load_dataset("aime24")}  # leading zeros kept as given
    assert load_dataset("aime25")[0].metadata["contest"] == "AIME 2025 I"
    assert (DATA_DIR / "SOURCES.md").is_file()


def test_embedded() -> None:
    examples = load_dataset("embedded", limit=20)
    assert len(examples) == 20
    assert len({e.id for e in examples}) == 20
    for example in examples:
        assert example.kind == "embedded"
        assert ";?" in example.problem
        assert example.answer is not None and example.answer.lstrip("-").isdigit()
        assert example.metadata["solution"].endswith(f"#### {example.answer}")


def _write(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_user_jsonl(tmp_path) -> None:
    path = _write(tmp_path, [
        json.dumps({"problem": "What is 2+2?", "answer": "4", "id": "q1", "source": "me"}),
        "",
        json.dumps({"problem": "Name a prime.", "answer": 7}),
        json.dumps({"problem": "No answer here"}),
    ])
    examples = load_dataset("jsonl", path=path)
    assert [e.id for e in examples] == ["q1", "mine-1", "mine-2"]
    assert [e.answer for e in examples] == ["4", "7", None]
    assert {e.kind for e in examples} == {"user"}
    assert examples[0].metadata == {"source": "me"}
    assert examples[0] == Example("q1", "What is 2+2?", "4", "user")  # metadata not compared
    assert len(load_dataset("jsonl", path=path, limit=2)) == 2


@pytest.mark.parametrize(("lines", "message"), [
    (['{"problem": "ok"}', "{not json"], "line 2: not valid JSON"),
    (['{"problem": "ok"}', '{"question": "x"}'], "line 2: missing required field 'problem'"),
    (['{"problem": "   "}'], "line 1: 'problem' is empty"),
    (['{"problem": 3}'], "line 1: 'problem' must be a string"),
    (['[1, 2]'], "line 1: expected a JSON object"),
    (['{"problem": "a", "id": "x"}', '{"problem": "b", "id": "x"}'], "duplicate id 'x'"),
])
def test_user_jsonl_errors(tmp_path, lines: list[str], message: str) -> None:
    path = _write(tmp_path, lines)
    with pytest.raises(DatasetError, match="mine.jsonl") as info:
        load_dataset("jsonl", path=path)
    assert message in str(info.value)


def test_argument_errors(tmp_path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'gsm9k'.*gsm8k, math500"):
        load_dataset("gsm9k")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("jsonl", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DatasetError, match="needs path="):
        load_dataset("jsonl")
    with pytest.raises(DatasetError, match="only used with name 'jsonl'"):
        load_dataset("gsm8k", path="x.jsonl")
    for bad in (0, -3):
        with pytest.raises(DatasetError, match="limit must be a positive integer"):
            load_dataset("aime24", limit=bad)
    assert issubclass(DatasetError, ValueError)


def test_hf_needs_datasets_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails, installed or not
    with pytest.raises(DatasetError, match=r"pip install 'stepcascade\[bench\]'"):
        load_dataset("hf:openai/gsm8k:main")


def test_hf_column_mapping(monkeypatch) -> None:
    """The mapping, with a stand-in for the `datasets` package (no hub access here)."""
    calls = []

    def fake_load(dataset_id: str, config: str | None):
        calls.append((dataset_id, config))
        return {"train": [{"question": "unused", "answer": "#### 1"}],
                "test": [{"question": "Q1", "answer": "steps\n#### 1,234"},
                         {"question": "Q2", "answer": "more\n#### 5"},
                         {"question": "Q3", "answer": "#### 6"}]}

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=fake_load))
    examples = load_dataset("hf:openai/gsm8k:main", limit=2)
    assert calls == [("openai/gsm8k", "main")]
    assert [(e.id, e.problem, e.answer, e.kind) for e in examples] == [
        ("openai/gsm8k:main-0", "Q1", "1234", "gsm8k"), ("openai/gsm8k:main-1", "Q2", "5", "gsm8k")]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=lambda *_: [
        {"problem": "P", "solution": "so $\\boxed{\\frac{1}{2}}$.", "unique_id": "u7", "level": 3}]))
    (example,) = load_dataset("hf:someone/MATH-sub")
    assert (example.id, example.answer, example.kind) == ("u7", "\\frac{1}{2}", "math")
    assert example.metadata == {"level": 3}


def test_sources_table_matches_the_shipped_bytes() -> None:
    """SOURCES.md lists each shipped file's lines, bytes and sha256: they must be the files'."""
    import hashlib
    import re

    table = re.findall(r"^\| (\S+\.jsonl) \| (\d+) \| (\d+) \| `([0-9a-f]{64})` \|$",
                       (DATA_DIR / "SOURCES.md").read_text(), flags=re.MULTILINE)
    assert {row[0] for row in table} == {"gsm8k_test.jsonl", "math500_test.jsonl", "aime24.jsonl",
                                         "aime25.jsonl"}
    for name, lines, size, digest in table:
        data = (DATA_DIR / name).read_bytes()
        measured = (data.count(b"\n"), len(data), hashlib.sha256(data).hexdigest())
        assert measured == (int(lines), int(size), digest)


@pytest.mark.parametrize("split", ["calibration", "test"])
def test_committed_embedded_splits_load_as_user_files(split: str) -> None:
    # `cascade calibrate --problems bench/data/embedded_calibration.jsonl` reads them this way
    examples = load_dataset("jsonl", path=str(DATA_DIR / f"embedded_{split}.jsonl"))
    assert len(examples) == 1000 and len({e.id for e in examples}) == 1000
    assert all(e.id.startswith(f"{split}-") and ";?" in e.problem and e.answer for e in examples)
    if split == "test":  # the "embedded" dataset is this file, graded as integers
        embedded = load_dataset("embedded")
        def rows(items):
            return [(e.id, e.problem, e.answer) for e in items]
        assert rows(embedded) == rows(examples)
