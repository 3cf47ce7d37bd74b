"""Benchmark datasets: the shipped math sets, the embedded synthetic task, user files, HF hub.

Every loader returns a list of `Example`. An example's `kind` names the grader that
`bench.grading` applies to it:

=============  ==========================================================  ==========
name           source                                                      kind
=============  ==========================================================  ==========
``gsm8k``      ``bench/data/gsm8k_test.jsonl`` (1319 problems)             gsm8k
``math500``    ``bench/data/math500_test.jsonl`` (500 problems)            math
``aime24``     ``bench/data/aime24.jsonl`` (30 problems)                   aime
``aime25``     ``bench/data/aime25.jsonl`` (30 problems)                   aime
``embedded``   ``bench.tasks.generate_split("test", n)``, n = limit or     embedded
               1000
``jsonl``      a user file, ``path=``: one JSON object a line with         user
               ``problem`` (required), ``answer`` and ``id`` (optional)
``hf:<id>``    a Hugging Face hub dataset (``hf:<id>`` or                  gsm8k, aime,
               ``hf:<id>:<config>``), through the optional ``datasets``    math or user
               package
=============  ==========================================================  ==========

Attribution and licences of the shipped files: ``bench/data/SOURCES.md``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DATASET_NAMES",
    "DATA_DIR",
    "DEFAULT_EMBEDDED_SIZE",
    "DatasetError",
    "Example",
    "Kind",
    "load_dataset",
]

Kind = Literal["gsm8k", "math", "aime", "embedded", "user"]

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_EMBEDDED_SIZE = 1000

# Shipped files: name -> (file name, grading kind).
_SHIPPED: dict[str, tuple[str, Kind]] = {
    "gsm8k": ("gsm8k_test.jsonl", "gsm8k"),
    "math500": ("math500_test.jsonl", "math"),
    "aime24": ("aime24.jsonl", "aime"),
    "aime25": ("aime25.jsonl", "aime"),
}
DATASET_NAMES: tuple[str, ...] = (*_SHIPPED, "embedded", "jsonl", "hf:<dataset id>")

# Column names tried, in order, for hub datasets.
_HF_PROBLEM_COLUMNS = ("problem", "question", "Problem", "Question", "prompt", "input")
_HF_ANSWER_COLUMNS = ("answer", "Answer", "final_answer", "solution", "Solution", "target")
_HF_ID_COLUMNS = ("id", "unique_id", "ID", "idx")


class DatasetError(ValueError):
    """A dataset cannot be loaded: unknown name, missing file, malformed line, bad argument."""


@dataclass(frozen=True)
class Example:
    """One benchmark problem.

    id: unique within its dataset. problem: the text sent to the model. answer: the
    reference final answer (None when unknown, e.g. a user file without answers).
    kind: selects the grader in `bench.grading`. metadata: every other field of the
    source record (reference solution, subject, level, ...); not part of equality.
    """

    id: str
    problem: str
    answer: str | None
    kind: Kind
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


def load_dataset(name: str, limit: int | None = None, path: str | None = None) -> list[Example]:
    """Load a benchmark by name (see the module docstring); the first `limit` examples if given.

    `path` is required by (and only accepted with) name "jsonl". Raises `DatasetError`.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit must be a positive integer or None, got {limit!r}")
    if path is not None and name != "jsonl":
        raise DatasetError(f"path= is only used with name 'jsonl', not {name!r}")
    if name in _SHIPPED:
        file_name, kind = _SHIPPED[name]
        return _read_jsonl(DATA_DIR / file_name, kind, limit)
    if name == "embedded":
        return _load_embedded(limit)
    if name == "jsonl":
        if path is None:
            raise DatasetError("name 'jsonl' needs path= (a JSONL file with a 'problem' field a line)")
        return _read_jsonl(Path(path), "user", limit)
    if name.startswith("hf:"):
        return _load_hf(name[len("hf:"):], limit)
    raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def _load_embedded(limit: int | None) -> list[Example]:
    from bench.tasks import generate_split  # the task module is heavier; import on demand

    return [
        Example(id=p.id, problem=p.problem, answer=p.answer, kind="embedded",
                metadata={"solution": p.solution})
        for p in generate_split("test", limit or DEFAULT_EMBEDDED_SIZE)
    ]


def _read_jsonl(path: Path, kind: Kind, limit: int | None) -> list[Example]:
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    examples: list[Example] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
            example = _make_example(record, kind, default_id=f"{path.stem}-{len(examples)}",
                                    where=where)
            if example.id in seen:
                raise DatasetError(f"{where}: duplicate id {example.id!r} "
                                   f"(first on line {seen[example.id]})")
            seen[example.id] = line_number
            examples.append(example)
    return examples


def _make_example(record: Mapping[str, Any], kind: Kind, default_id: str, where: str) -> Example:
    if "problem" not in record:
        raise DatasetError(f"{where}: missing required field 'problem'")
    problem = record["problem"]
    if not isinstance(problem, str):
        raise DatasetError(f"{where}: 'problem' must be a string, got {type(problem).__name__}")
    if not problem.strip():
        raise DatasetError(f"{where}: 'problem' is empty")
    answer = _as_text(record.get("answer"), "answer", where)
    if answer is not None and not answer.strip():
        raise DatasetError(f"{where}: 'answer' is empty (leave it out or use null)")
    example_id = _as_text(record.get("id"), "id", where) or default_id
    metadata = {k: v for k, v in record.items() if k not in ("id", "problem", "answer")}
    return Example(id=example_id, problem=problem, answer=answer, kind=kind, metadata=metadata)


def _as_text(value: Any, field_name: str, where: str) -> str | None:
    """A string, number or null field as text (None for null / absent)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetError(f"{where}: '{field_name}' must be a string or a number, "
                           f"got {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def _load_hf(spec: str, limit: int | None) -> list[Example]:
    """`spec` is "<dataset id>" or "<dataset id>:<config>"; the "test" split if present."""
    dataset_id, _, config = spec.partition(":")
    if not dataset_id:
        raise DatasetError("'hf:' needs a dataset id, e.g. 'hf:openai/gsm8k:main'")
    try:
        import datasets as hf_datasets  # optional dependency
    except ImportError:
        raise DatasetError(
            f"loading 'hf:{spec}' needs the optional 'datasets' package: "
            "pip install 'stepcascade[bench]' (or: pip install datasets)"
        ) from None
    try:
        loaded = hf_datasets.load_dataset(dataset_id, config or None)
    except Exception as error:  # network, unknown id, missing config: report, don't crash oddly
        raise DatasetError(f"could not load hub dataset {spec!r}: {error}") from error
    rows: Iterable[Mapping[str, Any]] = loaded
    if isinstance(loaded, Mapping):  # a DatasetDict: pick the test split, else the first one
        if not loaded:
            raise DatasetError(f"hub dataset {spec!r} has no splits")
        rows = loaded["test"] if "test" in loaded else next(iter(loaded.values()))
    kind = _hf_kind(dataset_id)
    examples: list[Example] = []
    for index, row in enumerate(rows):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(_hf_example(row, spec, index, kind))
    if len({e.id for e in examples}) != len(examples):
        raise DatasetError(f"hub dataset {spec!r} has duplicate ids")
    return examples


def _hf_kind(dataset_id: str) -> Kind:
    lowered = dataset_id.lower()
    if "gsm8k" in lowered:
        return "gsm8k"
    if "aime" in lowered:
        return "aime"
    if "math" in lowered:
        return "math"
    return "user"


def _hf_example(row: Mapping[str, Any], spec: str, index: int, kind: Kind) -> Example:
    where = f"hub dataset {spec!r}, row {index}"
    problem_column = next((c for c in _HF_PROBLEM_COLUMNS if c in row), None)
    if problem_column is None:
        raise DatasetError(f"{where}: no problem column (tried {', '.join(_HF_PROBLEM_COLUMNS)}); "
                           f"columns are {', '.join(row)}")
    answer_column = next((c for c in _HF_ANSWER_COLUMNS if row.get(c) is not None), None)
    answer = None
    if answer_column is not None:
        answer = _hf_answer(_as_text(row[answer_column], answer_column, where) or "")
    id_column = next((c for c in _HF_ID_COLUMNS if row.get(c) is not None), None)
    example_id = str(row[id_column]) if id_column else f"{spec}-{index}"
    used = {problem_column, answer_column, id_column}
    record = {"id": example_id, "problem": row[problem_column], "answer": answer,
              **{k: v for k, v in row.items() if k not in used}}
    return _make_example(record, kind, default_id=example_id, where=where)


def _hf_answer(text: str) -> str | None:
    """The final answer in a hub answer/solution field: after '####' (GSM8K), else a
    \\boxed{} answer (MATH solutions), else the whole field."""
    from bench.grading import extract_final_answer

    text = text.strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif "\\boxed" in text or "\\fbox" in text:
        text = extract_final_answer(text) or text
    return text or None
