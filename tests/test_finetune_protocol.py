"""The end-to-end fine-tune benchmark's plumbing (benchmarks/finetune_cpu.py): which settings each ablation
runs with, that the project's config accepts them, and the RESULTS.md block it writes beside report_cpu's."""

import json
import statistics
from types import SimpleNamespace

import pytest

from benchmarks import finetune_cpu, report_cpu
from dsrh_lightning.config import load_config

TUNED = {"DSRH": {"48": {"overrides": [
    "dataset=cifar10", "experiment=dsrh", "loss.margin_scaling=per_bit", "loss.orth_norm=bits",
    "loss.orth_weight=0.8", "loss.cls_weight=1.9", "loss.margin=0.38", "model.dropout=0.5", "optim.lr=0.0068"],
    "best_val_map": 0.5, "trials": 8, "steps": 1500}}}


def _args(tmp_path, **kw):
    args = dict(dataset="cifar10", data_root=str(tmp_path / "data"), split_dir=str(tmp_path / "splits"),
                backbone="efficientnet_lite0", weights="imagenet", image_size=64, sampling="balanced", batch_size=64,
                images_per_class=8, steps=1500, val_every=500, lr=0.01, backbone_lr_mult=1.0, lr_decay_steps=1000,
                output_dir=str(tmp_path / "runs"), override=[])
    args.update(kw)
    return SimpleNamespace(**args)


def _settings(over):
    return dict(o.split("=", 1) for o in over)


@pytest.mark.parametrize("method, classifier, orth, cls", [
    ("DRH", False, 0.0, 0.0), ("DRH+", False, 0.8, 0.0), ("DSRH", True, 0.8, 1.9)])
def test_ablations_differ_only_in_their_terms(tmp_path, method, classifier, orth, cls):
    over = finetune_cpu.run_overrides(_args(tmp_path), method, 48, 0, TUNED)
    cfg = load_config(over)  # every key exists in the schema and every value is allowed
    assert cfg.model.classifier is classifier
    assert cfg.loss.orth_weight == pytest.approx(orth) and cfg.loss.cls_weight == pytest.approx(cls)
    # the shared recipe: the tuned margin and its scaling, a trainable backbone, the whole database, fair ties
    assert cfg.loss.margin == pytest.approx(0.38) and cfg.loss.margin_scaling == "per_bit"
    assert cfg.model.freeze_backbone is False and cfg.data.cache_features is False
    assert cfg.trainer.test_after_fit is True and cfg.eval.ties == "average" and cfg.eval.topk == 0
    # the heads' lr tuned on cached features is not used end to end
    assert cfg.optim.lr == pytest.approx(0.01) and cfg.optim.backbone_lr_mult == pytest.approx(1.0)
    assert cfg.resume == "auto" and cfg.name == finetune_cpu.run_name(method, 48, 0, 64)


def test_three_methods_share_every_other_setting(tmp_path):
    runs = {m: _settings(finetune_cpu.run_overrides(_args(tmp_path), m, 48, 0, TUNED)) for m in finetune_cpu.ABLATIONS}
    ablated = {"experiment", "name", "loss.orth_weight", "loss.cls_weight"}
    common = [{k: v for k, v in s.items() if k not in ablated} for s in runs.values()]
    assert common[0] == common[1] == common[2]
    assert len({s["name"] for s in runs.values()}) == 3  # separate run folders


def test_without_tuned_settings_the_experiment_configs_apply(tmp_path):
    cfg = load_config(finetune_cpu.run_overrides(_args(tmp_path), "DSRH", 48, 0, {}))
    shipped = load_config(["dataset=cifar10", "experiment=dsrh"])
    assert cfg.loss.margin == shipped.loss.margin and cfg.loss.orth_weight == shipped.loss.orth_weight


def test_an_end_to_end_search_sets_each_methods_own_lr_and_settings(tmp_path):
    """A method's own entry from tune_cpu.py --protocol finetune wins over the protocol's --lr (its lr, backbone
    multiplier, dropout and loss knobs); methods without one keep the recipe and --lr."""
    searched = {"overrides": ["dataset=cifar10", "experiment=drh", "loss.margin=0.2", "loss.triplet_average=active",
                              "model.dropout=0.25", "optim.backbone_lr_mult=0.3", "optim.lr=0.003"],
                "best_val_map": 0.4, "trials": 6, "steps": 1500, "protocol": "finetune"}
    tuned = dict(TUNED, DRH={"48": searched})
    for bits in (12, 48):  # the nearest tuned length
        cfg = load_config(finetune_cpu.run_overrides(_args(tmp_path), "DRH", bits, 0, tuned))
        assert cfg.experiment == "drh" and not cfg.model.classifier and cfg.loss.cls_weight == 0.0
        assert (cfg.optim.lr, cfg.optim.backbone_lr_mult, cfg.model.dropout) == (0.003, 0.3, 0.25)
        assert cfg.loss.margin == pytest.approx(0.2) and cfg.loss.triplet_average == "active"
    assert cfg.name.startswith(finetune_cpu.run_name("DRH", 48, 0, 64) + "-")  # not the untuned run's folder
    plus = load_config(finetune_cpu.run_overrides(_args(tmp_path), "DRH+", 48, 0, tuned))  # DSRH's recipe, --lr
    assert plus.optim.lr == pytest.approx(0.01) and plus.loss.margin == pytest.approx(0.38)
    # a frozen-feature entry of the method's own keeps the old rule: recipe first, --lr for every method
    frozen = dict(TUNED, DRH={"48": dict(searched, protocol="frozen")})
    cfg = load_config(finetune_cpu.run_overrides(_args(tmp_path), "DRH", 48, 0, frozen))
    assert cfg.optim.lr == pytest.approx(0.01) and cfg.loss.margin == pytest.approx(0.38)


def _row(method, val, test):
    return dict(method=method, bits=48, seed=0, image_size=64, backbone="efficientnet_lite0", steps=1500,
                batch_size=64, sampling="balanced", lr=0.01, backbone_lr_mult=1.0, map=test, precision_r2=0.3,
                best_val_map=val, database=59000, queries=1000, seconds=1500.0, commit="abc1234",
                date="2026-11-23T17:00:00", machine="test CPU, 2 cores")


def test_report_block_rows_best_first_and_coexists_with_report_cpu(tmp_path):
    rows = [_row("DSRH", 0.61, 0.6), _row("DRH", 0.51, 0.5), _row("DRH+", 0.56, 0.55)]
    block = finetune_cpu.report(rows, "finetune.jsonl")
    body = [line for line in block if line.startswith("| DR") or line.startswith("| DS")]
    assert [line.split("|")[1].strip() for line in body] == ["DSRH", "DRH+", "DRH"]  # best test MAP first
    assert "| 0.600 |" in body[0] and body[0].endswith("| 25.0 |")
    results = tmp_path / "RESULTS.md"
    begin, end = report_cpu.HEADLINE
    results.write_text("# Results\n\nintro\n\n" + begin + "\nold tables\n" + end + "\n\nend text\n")
    report_cpu.replace_block(results, finetune_cpu.BEGIN, finetune_cpu.END, block)
    report_cpu.replace_block(results, begin, end, [begin, "new tables", end])
    report_cpu.replace_block(results, finetune_cpu.BEGIN, finetune_cpu.END, finetune_cpu.report(rows[:1], "x"))
    text = results.read_text()
    assert "old tables" not in text and text.count("new tables") == 1 and "intro" in text and "end text" in text
    assert text.count(finetune_cpu.BEGIN) == 1 and text.count("| DSRH |") == 1 and "| DRH |" not in text
    assert text.index("new tables") < text.index(finetune_cpu.BEGIN)


def test_report_names_every_source_and_puts_longer_runs_after_the_rest(tmp_path):
    long_run = dict(_row("DSRH", 0.67, 0.66), steps=2400)
    block = finetune_cpu.report([long_run, _row("DSRH", 0.61, 0.6), _row("DRH", 0.51, 0.5)], "`a.jsonl`, `b.jsonl`")
    assert block[1].startswith("From `a.jsonl`, `b.jsonl` (3 runs;")
    body = [line.split("|")[5].strip() for line in block if line.startswith("| D")]
    assert body == ["1500", "1500", "2400"]


def test_also_report_adds_rows_once_without_running(tmp_path):
    """--report-only --also-report: the block shows the rows of both files, a file named twice counts once."""
    first, second = tmp_path / "ft.jsonl", tmp_path / "ft_long.jsonl"
    first.write_text(json.dumps(_row("DRH", 0.51, 0.5)) + "\n" + json.dumps(_row("DSRH", 0.61, 0.6)) + "\n")
    second.write_text(json.dumps(dict(_row("DSRH", 0.67, 0.66), steps=2400)) + "\n")
    docs = tmp_path / "docs"
    finetune_cpu.main(["--tuned", "", "--report-only", "--results", str(first), "--also-report", str(second),
                       str(first), "--docs", str(docs)])
    text = (docs / "RESULTS.md").read_text()
    assert text.count("| DSRH |") == 2 and text.count("| DRH |") == 1 and "(3 runs;" in text
    assert f"`{first.resolve()}`, `{second.resolve()}`" in text  # files outside the repository keep their path


def test_report_without_runs_says_how_to_measure():
    block = finetune_cpu.report([], "x")
    assert block[0] == finetune_cpu.BEGIN and block[-1] == finetune_cpu.END and "make bench-finetune" in block[1]


def test_partial_protocol_trains_the_top_blocks_on_a_cache(tmp_path):
    args = _args(tmp_path, train_blocks=3, image_size=96, feature_dir=str(tmp_path / "f"))
    cfg = load_config(finetune_cpu.run_overrides(args, "DSRH", 48, 0, TUNED))
    assert cfg.model.train_blocks == 3 and cfg.data.cache_features and cfg.data.feature_dir == str(tmp_path / "f")
    assert cfg.name == finetune_cpu.run_name("DSRH", 48, 0, 96, 3) != finetune_cpu.run_name("DSRH", 48, 0, 96)


@pytest.mark.parametrize("method", list(finetune_cpu.METHODS))
def test_every_method_is_a_valid_end_to_end_run(tmp_path, method):
    cfg = load_config(finetune_cpu.run_overrides(_args(tmp_path, train_blocks=3, feature_dir="f"), method, 12, 2, TUNED))
    assert cfg.experiment == finetune_cpu.METHODS[method] and cfg.model.bits == 12 and cfg.seed == 2


def test_summary_gives_mean_and_spread_best_first_per_length():
    rows = [dict(_row("DSRH", 0.6, v), seed=s, train_blocks=3) for s, v in enumerate([0.6, 0.7])]
    rows += [dict(_row("HashNet", 0.6, 0.62), train_blocks=3), dict(_row("DRH", 0.5, 0.5), bits=12)]
    lines = finetune_cpu.summary(rows)
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| method")]
    assert [line.split("|")[1].strip() for line in body] == ["DRH", "DSRH", "HashNet"]  # 12 bits first
    sd = statistics.stdev([0.6, 0.7])
    assert f"| DSRH | 48 | 64 px | top 3 | 1500 | 0, 1 | {0.65:.3f} ± {sd:.3f} |" in body[1]
    assert "| DRH | 12 | 64 px | all | 1500 | 0 | 0.500 |" in body[0] and body[0].endswith("| 25.0 |")


def test_the_cpu_warning_quotes_the_measured_result_of_the_recipe_it_names():
    """The long-run warning's recipe exists and its MAP is the mean of the canonical DSRH rows at 48 bits."""
    import re
    from pathlib import Path

    from dsrh_lightning.lightning.callbacks.progress import CPU_RECIPE

    repo = Path(__file__).resolve().parents[1]
    experiment = re.search(r"experiment=(\w+)", CPU_RECIPE).group(1)
    assert (repo / "experiments" / "configs" / "experiment" / f"{experiment}.yaml").is_file()
    cfg = load_config(["dataset=cifar10", f"experiment={experiment}"])
    quoted = float(re.search(r"(0\.\d{3}) test MAP@all at 48 bits", CPU_RECIPE).group(1))
    rows = [r for r in (json.loads(line) for line in (repo / "benchmarks" / "results" / "finetune_cpu.jsonl")
                        .read_text().splitlines() if line.strip())
            if r["method"] == "DSRH" and r["bits"] == 48 and r["image_size"] == cfg.data.image_size
            and r.get("train_blocks") == cfg.model.train_blocks and r["steps"] == cfg.trainer.max_steps]
    assert rows and quoted == pytest.approx(statistics.mean(r["map"] for r in rows), abs=5e-4)


def test_a_searched_run_is_not_taken_for_the_untuned_row_and_reports_apart(tmp_path):
    """make bench-finetune skips a run only when a row has its run folder: the untuned row of a method does not
    stand for the run with its end-to-end search's settings, and the report keeps the two apart."""
    searched = {"overrides": ["dataset=cifar10", "experiment=drh", "optim.lr=0.06", "model.dropout=0.0"],
                "best_val_map": 0.48, "trials": 6, "steps": 1500, "protocol": "finetune"}
    args = _args(tmp_path)
    untuned = finetune_cpu.run_overrides(args, "DRH", 48, 0, TUNED)
    tuned = finetune_cpu.run_overrides(args, "DRH", 48, 0, dict(TUNED, DRH={"48": searched}))
    old = dict(_row("DRH", 0.24, 0.236), run_dir=str(tmp_path / "runs" / finetune_cpu.run_name("DRH", 48, 0, 64)))
    assert finetune_cpu.already_measured([old], untuned) and not finetune_cpu.already_measured([old], tuned)
    new = dict(_row("DRH", 0.48, 0.47), searched=True)
    lines = finetune_cpu.summary([old, new])
    assert any(line.startswith("| DRH | 48 |") and "0.236" in line for line in lines)
    assert any(line.startswith("| DRH (searched) | 48 |") and "0.470" in line for line in lines)
