"""The docs' result tables match the committed JSON (bench/docs_tables.py), and the README's
test command is the one .ci/run runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bench import docs_tables
from bench.docs_tables import RESULTS, ROOT, TABLES, doc_files, render, rewrite, stale_regions


def _copy_docs(to: Path) -> None:
    for path in doc_files(ROOT):
        target = to / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)


def test_committed_docs_match_the_committed_json():
    assert stale_regions() == [], "run: python -m bench.docs_tables"


def test_every_table_appears_in_the_docs_and_the_readme_has_the_headline():
    text = {path.relative_to(ROOT).as_posix(): path.read_text() for path in doc_files()}
    used = {name for body in text.values() for name in re.findall(r"<!-- table:([a-z0-9-]+) -->", body)}
    assert used == set(TABLES)
    assert re.findall(r"<!-- table:([a-z0-9-]+) -->", text["README.md"]) == ["gates", "pair-accuracy"]


def test_a_figure_edited_by_hand_is_caught_and_regenerating_restores_it(tmp_path):
    _copy_docs(tmp_path)
    readme = tmp_path / "README.md"
    original = readme.read_text()
    row = next(line for line in original.splitlines() if line.startswith("| verify + token rewrite"))
    edited = row.replace("x |", "5x |", 1)  # 2.80x -> 2.805x, as a hand edit would
    assert edited != row
    readme.write_text(original.replace(row, edited))
    assert stale_regions(tmp_path) == ["README.md: table gates"]
    readme.write_text(rewrite(readme.read_text()))
    assert readme.read_text() == original and stale_regions(tmp_path) == []


def test_a_json_changed_without_regenerating_is_caught(tmp_path):
    _copy_docs(tmp_path)
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.png", "*.jsonl", "*.pt", "*.npz"))
    report = json.loads((results / "calibration" / "report.json").read_text())
    report["budgets"][0]["test_accuracy"] = 0.9
    (results / "calibration" / "report.json").write_text(json.dumps(report))
    assert stale_regions(tmp_path, results) == ["docs/results.md: table calibration"]
    assert "| 0.900 |" in render("calibration", results)


# Qwen2.5-Coder 0.5B -> 1.5B (docs/real-models.md)
def test_each_table_names_its_pair_command_and_commit():
    for name in TABLES:
        text = render(name)
        if name.startswith("real-pair-"):  # the real pair's tables, by name
            assert "qwen2.5-coder-0.5b" in text and "qwen2.5-coder-1.5b" in text, name
        else:
            assert "embedded:small" in text and "embedded:large" in text, name
        assert re.search(r"(python -m bench\.|cascade bench|python runs/|bash runs/)", text), name
        assert re.search(r"at `[0-9a-f]{7}", text), name


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_links_resolve_from_the_file_that_holds_them():
    assert "](bench/results/gates/report.json)" in render("gates")
    assert "](../bench/results/gates/report.json)" in render("gates", root_link="../")
    for path in doc_files():
        text = path.read_text()
        for target, anchor in re.findall(r"\]\(([^)#:]*)(?:#([^)]*))?\)", text):
            where = f"{path.relative_to(ROOT)} links to {target}#{anchor}"
            linked = path.parent / target if target else path
            assert linked.exists(), where
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked.read_text()), where


def test_bad_regions_are_named(tmp_path):
    (tmp_path / "README.md").write_text("<!-- table:gates -->\nno end marker\n")
    assert "README.md: a `<!-- table:NAME -->` marker without" in stale_regions(tmp_path)[0]
    with pytest.raises(KeyError, match="unknown table 'nope'; known: gates"):
        rewrite("<!-- table:nope -->\n<!-- /table:nope -->")


def test_missing_result_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gates/report.json: the committed result"):
        render("gates", tmp_path)


def test_check_mode_exits_nonzero_on_stale_docs(tmp_path, monkeypatch, capsys):
    _copy_docs(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("| 0.990 |", "| 0.991 |", 1))
    monkeypatch.setattr(docs_tables, "ROOT", tmp_path)
    assert docs_tables.main(["--check"]) == 1
    assert "stale: README.md: table gates" in capsys.readouterr().err
    assert docs_tables.main([]) == 0 and docs_tables.main(["--check"]) == 0


def test_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    readme = (ROOT / "README.md").read_text()
    assert " && ".join(commands) in readme.splitlines()
    assert "ruff check ." in commands[-1]


def test_readme_stays_short():
    # issue 20: a newcomer reads it in five minutes; details belong in docs/
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
