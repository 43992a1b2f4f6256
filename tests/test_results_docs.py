"""docs/RESULTS.md as a results suite: its generated tables are what the report code writes from the canonical
results files, it opens with a table, and every results file the docs and the Makefile name exists."""

import re
import shutil
from pathlib import Path

import pytest

from benchmarks import finetune_cpu, multilabel_cpu, report_cpu, results_cpu

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS = REPO / "docs" / "RESULTS.md"


def test_results_doc_opens_with_a_table_and_reads_in_minutes():
    lines = DOCS.read_text().splitlines()
    first_table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert first_table < 40, f"the first table starts at line {first_table + 1}"
    assert len(lines) < 250


def test_generated_blocks_are_what_the_canonical_results_give(tmp_path):
    """`make bench-report` run on the canonical files rewrites nothing: the shipped tables are the files' numbers."""
    shutil.copy(DOCS, tmp_path / "RESULTS.md")
    results_cpu.main(["--tuned", str(RESULTS_DIR / "tuned_cpu.json"), "--results",
                      str(RESULTS_DIR / "results_cpu_tuned.jsonl"), "--report-only", "--docs", str(tmp_path)])
    finetune_cpu.main(["--tuned", str(RESULTS_DIR / "finetune_cpu_recipe.json"), "--results",
                       str(RESULTS_DIR / "finetune_cpu.jsonl"), "--report-only", "--docs", str(tmp_path)])
    multilabel_cpu.main(["--results", str(RESULTS_DIR / "multilabel_cpu.jsonl"), "--tuned",
                         str(RESULTS_DIR / "multilabel_tuned.json"), "--report-only", "--docs", str(tmp_path)])
    assert (tmp_path / "RESULTS.md").read_text() == DOCS.read_text()
    assert (tmp_path / "results_map_vs_bits.png").is_file() and (tmp_path / "results_pr_48bits.png").is_file()


def test_report_rewrites_only_its_blocks_and_is_idempotent(tmp_path):
    rows = [{"method": m, "bits": b, "seed": s, "map": 0.1 * (i + 1) + 0.01 * s, "precision_r2": 0.2, "seconds": 3.0,
             "steps": 1500, "commit": "abc1234", "machine": "test CPU", "date": f"2026-01-0{s + 1}T00:00:00",
             "pr_curve": {"precision": [1.0, 0.5], "recall": [0.1, 1.0]}}
            for i, m in enumerate(["ITQ", "DSRH"]) for b in (12, 48) for s in (0, 1)]
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nintro\n\n" + "\n".join(report_cpu.HEADLINE) + "\n\nreading\n\n"
                   + "\n".join(report_cpu.DETAILS) + "\n\nappendix\n")
    report_cpu.write_report(rows, tmp_path, order=["ITQ", "DSRH"], source="r.jsonl")
    once = doc.read_text()
    report_cpu.write_report(rows, tmp_path, order=["ITQ", "DSRH"], source="r.jsonl")
    assert doc.read_text() == once
    headline = once[once.index(report_cpu.HEADLINE[0]):once.index(report_cpu.HEADLINE[1])]
    details = once[once.index(report_cpu.DETAILS[0]):once.index(report_cpu.DETAILS[1])]
    assert "| DSRH | **0.2050 ± 0.0071 (n=2)** |" in headline and "From `r.jsonl` (8 runs;" in headline
    assert "Precision within Hamming radius 2" in details and "Precision" not in headline
    assert once.index("intro") < once.index(report_cpu.HEADLINE[0]) < once.index("reading")
    assert once.index("reading") < once.index(report_cpu.DETAILS[0]) < once.index("appendix")


def test_results_folder_keeps_the_canonical_files_at_its_top():
    top = [p.name for p in RESULTS_DIR.iterdir() if p.is_file()]
    assert len(top) <= 12, sorted(top)
    assert not [name for name in top if re.search(r"round|probe", name)], "earlier rounds and probes go to archive/"


@pytest.mark.parametrize("doc", ["docs/RESULTS.md", "docs/BENCHMARKS.md", "README.md", "Makefile"])
def test_every_results_file_named_exists(doc):
    named = set(re.findall(r"benchmarks/results/[\w/.-]+\.jsonl?\b", (REPO / doc).read_text()))
    missing = sorted(path for path in named if not (REPO / path).is_file())
    assert not missing, f"{doc} names {missing}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", ["README.md", "docs/RESULTS.md", "docs/BENCHMARKS.md"])
def test_links_into_the_docs_reach_a_file_and_heading(doc):
    source = REPO / doc
    broken = []
    for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?#([\w-]+)\)", source.read_text()):
        path = (source.parent / target) if target else source
        headings = [line.lstrip("#") for line in path.read_text().splitlines() if line.startswith("#")] \
            if path.is_file() else []
        if anchor not in {_anchor(h) for h in headings}:
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{doc} links to {broken}"
