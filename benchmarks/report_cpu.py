"""Tables and plots of the CPU protocol from its results file (JSON lines, see results_cpu.py).

Writes two generated blocks of ``docs/RESULTS.md`` (each between its BEGIN/END GENERATED markers; the
hand-written text around them is kept): the headline MAP@all table near the top, and the details (the
settings found on validation, precision within Hamming radius 2, wall time, plots) further down; and
the figures ``docs/results_map_vs_bits.png`` and ``docs/results_pr_48bits.png``. Only measured rows are
shown; each cell says how many seeds it averages. The text depends only on the results (no date of
writing), so regenerating from unchanged files changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

HEADLINE = ("<!-- BEGIN GENERATED headline (benchmarks/report_cpu.py) -->", "<!-- END GENERATED headline -->")
DETAILS = ("<!-- BEGIN GENERATED details (benchmarks/report_cpu.py) -->", "<!-- END GENERATED details -->")


def _order(rows, order=()):
    """Methods present in ``rows``: those in ``order`` first (in that order), then the rest sorted."""
    present = {r["method"] for r in rows}
    return [m for m in order if m in present] + sorted(present - set(order))


def aggregate(rows, key):
    """{(method, bits): (mean, std, n)} of ``key`` over seeds (std with ddof=1; 0 for one seed)."""
    vals = defaultdict(list)
    for r in rows:
        vals[(r["method"], r["bits"])].append(r[key])
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in vals.items()}


def table(rows, key, title, order=()):
    agg = aggregate(rows, key)
    bits = sorted({r["bits"] for r in rows})
    lines = [f"**{title}** (mean ± std over seeds; n = number of seeds)", "",
             "| method | " + " | ".join(f"{b} bits" for b in bits) + " |",
             "|---|" + "---|" * len(bits)]
    best = {b: max((agg[(m, b)][0] for m in _order(rows, order) if (m, b) in agg), default=None) for b in bits}
    for m in _order(rows, order):
        cells = []
        for b in bits:
            if (m, b) not in agg:
                cells.append("not run")
                continue
            mean, std, n = agg[(m, b)]
            cell = f"{mean:.4f} ± {std:.4f} (n={n})"
            cells.append(f"**{cell}**" if mean == best[b] else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _line(method: str) -> str:
    """Dashed for the classical baselines, solid for the deep methods."""
    return "--" if method in ("LSH", "PCAH", "ITQ", "SH") else "-"


def _finish(fig, ax, title: str, path: Path) -> None:
    """Title, grid, legend; save at 110 dpi and close."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(rows, docs: Path, order=()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows, "map")
    methods = _order(rows, order)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, m in enumerate(methods):
        bits = sorted(b for (mm, b) in agg if mm == m)
        mean = np.array([agg[(m, b)][0] for b in bits])
        std = np.array([agg[(m, b)][1] for b in bits])
        ax.errorbar(bits, mean, yerr=std, fmt=_line(m) + "o", ms=4, capsize=3, label=m, color=plt.cm.tab20(i % 20))
    ax.set_xlabel("bits")
    ax.set_ylabel("MAP (whole database)")
    ax.set_xticks(sorted({r["bits"] for r in rows}))
    _finish(fig, ax, "CIFAR-10, EfficientNet-Lite0 cached features: MAP vs code length", docs / "results_map_vs_bits.png")

    fig, ax = plt.subplots(figsize=(7, 5.5))
    for i, m in enumerate(methods):
        curves = [r["pr_curve"] for r in rows if r["method"] == m and r["bits"] == 48 and "pr_curve" in r]
        if not curves:
            continue
        # Micro-averaged counts per seed; the plotted curve is the mean over seeds at each radius.
        prec = np.mean([c["precision"] for c in curves], axis=0)
        rec = np.mean([c["recall"] for c in curves], axis=0)
        ax.plot(rec, prec, _line(m), marker=".", ms=3, label=f"{m} (n={len(curves)})", color=plt.cm.tab20(i % 20))
    ax.set_xlabel("recall (within Hamming radius r, r = 0..48)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _finish(fig, ax, "PR curves by Hamming radius, 48 bits", docs / "results_pr_48bits.png")


def tuned_table(tuned: dict) -> str:
    """The settings the validation search chose (tune_cpu.py's JSON), one row per (method, tuned length).
    With ``--rescore`` the choice is the best mean validation MAP over seeds among the top trials."""
    rescored = any("mean_val_map" in t for by_bits in tuned.values() for t in by_bits.values())
    variants = any("alternatives" in t for by_bits in tuned.values() for t in by_bits.values())
    head = ("best of the top trials by mean validation MAP over seeds (`tune_cpu.py --rescore`"
            + (", then each choice's variants from `--alternatives`" if variants else "") + ")" if rescored
            else "best of the trials by best validation MAP")
    lines = [f"**Settings found on validation** ({head}; validation queries and a 5,000-image validation database, "
             "never the test queries)", "",
             "| method | tuned at | trials | steps | val MAP, search seed |" + (" val MAP, mean over seeds |" if rescored else "")
             + " settings (over the experiment config) |",
             "|---|---|---|---|---|" + ("---|" if rescored else "") + "---|"]
    for method, by_bits in tuned.items():
        for bits in sorted(by_bits, key=int):
            t = by_bits[bits]
            settings = " ".join(f"`{_short(o)}`" for o in t["overrides"] if not o.startswith("dataset="))
            mean = ""
            if "mean_val_map" in t:
                seeds = ", ".join(map(str, [t.get("seed", 0)] + list(t["rescore_seeds"])))
                n_variants = sum(1 for c in t["rescored"] if c.get("alternative"))
                of = f"best of {len(t['rescored']) - n_variants}" + (
                    f" + {n_variants} variant{'s' * (n_variants > 1)} ({', '.join(t.get('alternatives', []))})"
                    if n_variants else "")
                mean = f" {t['mean_val_map']:.4f} (seeds {seeds}; {of}) |"
            elif rescored:
                mean = " - |"
            lines.append(f"| {method} | {bits} bits | {t['trials']} | {t['steps']} | {t['best_val_map']:.4f} |{mean} "
                         f"{settings} |")
    return "\n".join(lines)


def _short(override: str) -> str:
    key, _, value = override.partition("=")
    try:
        number = float(value)
        value = value if number == int(number) and "." not in value else f"{number:.3g}"
    except ValueError:
        pass
    return f"{key}={value}"


def provenance(rows, source: str) -> str:
    """One line naming the results file and what its rows record: runs, seeds, steps, commits, machine, dates."""
    commits = sorted({r["commit"] for r in rows})
    machines = sorted({r["machine"] for r in rows})
    dates = sorted(r["date"] for r in rows)
    steps = sorted({r["steps"] for r in rows if r.get("steps")})
    seeds = sorted({r["seed"] for r in rows})
    return (f"From `{source}` ({len(rows)} runs; seeds {seeds}; deep-model steps {steps}; commits "
            f"{', '.join(commits)}; machine: {'; '.join(machines)}; measured {dates[0]} .. {dates[-1]}).")


def headline_block(rows, source: str, order=()) -> list:
    """The headline block: the results file's provenance and the MAP@all table (lines, markers included)."""
    return [HEADLINE[0], provenance(rows, source), "",
            table(rows, "map", "MAP@all (test queries ranked against the whole database)", order), HEADLINE[1]]


def details_block(rows, order=(), tuned=None) -> list:
    """The details block: the tuned settings, precision within radius 2, wall time per run and the plots."""
    secs = defaultdict(list)
    for r in rows:
        secs[r["method"]].append(r["seconds"])
    return [
        DETAILS[0],
        *([tuned_table(tuned), ""] if tuned else []),
        table(rows, "precision_r2", "Precision within Hamming radius 2 (0 when no item is within radius 2)", order),
        "",
        "Wall-clock seconds per run (fit or train + evaluation), mean over all runs of the method: "
        + ", ".join(f"{m} {np.mean(secs[m]):.0f} s" for m in _order(rows, order)) + ".",
        "",
        "![MAP vs bits](results_map_vs_bits.png)",
        "",
        "![PR curves at 48 bits](results_pr_48bits.png)",
        DETAILS[1],
    ]


def write_report(rows, docs: Path, args=None, order=(), source="benchmarks/results/results_cpu_tuned.jsonl",
                 tuned=None):
    """Rewrite RESULTS.md's headline and details blocks and the two figures in ``docs`` from ``rows``.
    ``order``: the methods' display order (results_cpu.ALL_METHODS); this module never imports results_cpu.
    ``tuned``: tune_cpu.py's JSON (its settings table opens the details)."""
    docs.mkdir(parents=True, exist_ok=True)
    if not rows:
        print("no results yet")
        return
    plots(rows, docs, order)
    replace_block(docs / "RESULTS.md", *HEADLINE, headline_block(rows, source, order))
    replace_block(docs / "RESULTS.md", *DETAILS, details_block(rows, order, tuned))


def replace_block(path: Path, begin: str, end: str, block) -> None:
    """Write ``block`` (lines, starting with ``begin`` and ending with ``end``) in place of the text between
    those markers in ``path``, keeping the text around them; appended when the markers are missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.is_file() else "# Results\n"
    if begin in text and end in text.split(begin, 1)[1]:
        head, rest = text.split(begin, 1)
        text = head + "\n".join(block) + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(block) + "\n"
    path.write_text(text)
    print(f"wrote {path}")
