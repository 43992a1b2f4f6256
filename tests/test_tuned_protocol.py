"""The tuned CPU protocol's plumbing (benchmarks/results_cpu.py, report_cpu.py): which validation-tuned
settings each method runs with, and the settings table the report shows."""

from pathlib import Path

import pytest

from benchmarks import report_cpu, results_cpu, tune_cpu

REPO = Path(__file__).resolve().parents[1]

TUNED = {
    "DSRH": {
        "12": {"overrides": ["dataset=cifar10", "experiment=dsrh", "loss.orth_norm=bits", "loss.orth_weight=0.1",
                             "loss.cls_weight=0.5", "optim.lr=0.02"], "best_val_map": 0.44, "trials": 8, "steps": 1500},
        "48": {"overrides": ["dataset=cifar10", "experiment=dsrh", "loss.orth_norm=bits", "loss.orth_weight=0.3",
                             "loss.cls_weight=1.5", "optim.lr=0.01"], "best_val_map": 0.55, "trials": 8, "steps": 1500},
    },
}


@pytest.mark.parametrize("bits, expected_lr", [(12, "0.02"), (24, "0.02"), (32, "0.01"), (48, "0.01"), (64, "0.01")])
def test_nearest_tuned_length(bits, expected_lr):
    over = results_cpu.tuned_overrides(TUNED, "DSRH", bits)
    assert f"optim.lr={expected_lr}" in over
    # the method's own experiment config and the protocol's dataset are never overridden by the search
    assert not any(o.startswith(("experiment=", "dataset=")) for o in over)


def test_ablations_take_dsrh_settings_without_their_terms():
    drh_plus = results_cpu.tuned_overrides(TUNED, "DRH+", 48)
    drh = results_cpu.tuned_overrides(TUNED, "DRH", 48)
    assert "loss.orth_weight=0.3" in drh_plus and not any(o.startswith("loss.cls_weight=") for o in drh_plus)
    assert not any(o.startswith(("loss.cls_weight=", "loss.orth_weight=")) for o in drh)
    assert "optim.lr=0.01" in drh and "loss.orth_norm=bits" in drh


def test_untuned_methods_and_no_file():
    assert results_cpu.tuned_overrides(TUNED, "HashNet", 48) is None
    assert results_cpu.tuned_overrides({}, "DSRH", 48) is None


def _protocol_args(tmp_path):
    import argparse
    p = argparse.ArgumentParser()
    results_cpu.add_protocol_args(p)
    return p.parse_args(["--data-root", str(tmp_path), "--feature-dir", str(tmp_path), "--split-dir", str(tmp_path)])


@pytest.mark.parametrize("name, bits, lr", [("DSRH", 12, 0.02), ("DRH", 48, 0.01), ("HashNet", 48, 0.01)])
def test_recorded_lr_is_the_one_the_config_uses(tmp_path, name, bits, lr):
    from dsrh_lightning.config import load_config

    args = _protocol_args(tmp_path)
    args.lr = 0.01 if name != "HashNet" else 0.0123  # untuned methods take --lr
    cfg = load_config(results_cpu.deep_overrides(name, args, bits, 0, TUNED, str(tmp_path)))
    assert cfg.optim.lr == pytest.approx(lr if name != "HashNet" else 0.0123)
    if name == "DRH":  # the ablation keeps DSRH's tuned scaling but not the ablated terms
        assert cfg.loss.orth_norm == "bits" and cfg.loss.orth_weight == 0 and cfg.loss.cls_weight == 0


def test_settings_table_lists_each_tuned_length():
    text = report_cpu.tuned_table(TUNED)
    rows = [line for line in text.splitlines() if line.startswith("| DSRH |")]
    assert len(rows) == 2 and "12 bits" in rows[0] and "48 bits" in rows[1]
    assert "`loss.orth_weight=0.3`" in rows[1] and "dataset=" not in text


def test_settings_table_shows_the_mean_over_seeds_of_rescored_choices():
    import copy

    tuned = copy.deepcopy(TUNED)
    tuned["DSRH"]["48"].update(mean_val_map=0.5432, rescore_seeds=[1, 2], rescored=[{}, {}, {}])
    rows = [line for line in report_cpu.tuned_table(tuned).splitlines() if line.startswith("| DSRH |")]
    assert "| 0.5500 | 0.5432 (seeds 0, 1, 2; best of 3) |" in rows[1]
    assert "| 0.4400 | - |" in rows[0]  # a length that was not rescored says so
    assert rows[0].count("|") == rows[1].count("|") == 8
    tuned["DSRH"]["48"].update(rescored=[{}, {}, {}, {"alternative": "data.sampling"}], alternatives=["data.sampling"])
    rows = [line for line in report_cpu.tuned_table(tuned).splitlines() if line.startswith("| DSRH |")]
    assert "(seeds 0, 1, 2; best of 3 + 1 variant (data.sampling)) |" in rows[1]


def test_shipped_dsrh_tuned_is_the_48_bit_search_winner():
    """experiment=dsrh_tuned holds the recorded search's 48-bit settings (3 significant digits; lr excluded)."""
    import json

    from dsrh_lightning.config import load_config

    tuned = json.loads((REPO / "benchmarks" / "results" / "tuned_cpu.json").read_text())["DSRH"]["48"]
    cfg = load_config(["experiment=dsrh_tuned"])
    found = dict(o.split("=", 1) for o in tuned["overrides"])
    assert found.pop("experiment") == "dsrh" and found.pop("dataset") == "cifar10"
    found.pop("optim.lr")
    for key, value in found.items():
        section, name = key.split(".")
        shipped = getattr(getattr(cfg, section), name)
        if isinstance(shipped, str):
            assert shipped == value, key
        else:
            assert float(shipped) == pytest.approx(float(value), rel=5e-3), key


def test_extra_overrides_win_over_tuned_settings(tmp_path):
    """results_cpu.py --override KEY=V changes a tuned key too (it used to be overridden by the tuned value)."""
    from dsrh_lightning.config import load_config

    args = _protocol_args(tmp_path)
    args.override = ["loss.cls_weight=0.05", "model.shared_dim=512"]
    cfg = load_config(results_cpu.deep_overrides("DSRH", args, 48, 0, TUNED, str(tmp_path)))
    assert cfg.loss.cls_weight == pytest.approx(0.05) and cfg.model.shared_dim == 512
    assert cfg.loss.orth_weight == pytest.approx(0.3)  # the other tuned settings stay


def test_pooled_rounds_keep_the_best_validation_trial_and_count_every_trial():
    def entry(best, trial, n, steps=1500):
        return {"overrides": [f"optim.lr={best}"], "best_val_map": best, "trial": trial, "trials": n,
                "steps": steps, "seconds": 10.0 * n, "all": [{"params": {"i": i}, "best_val_map": best} for i in range(n)]}

    earlier = {"DSRH": {"48": entry(0.55, "r2-009", 16)}}
    # An earlier round wins: its settings, every trial of both rounds counted.
    got = tune_cpu.pool_rounds(entry(0.54, "r3-004", 12), "out/tuned.json", [("a/round2.json", earlier)], "DSRH", 48)
    assert got["overrides"] == ["optim.lr=0.55"] and got["trial"] == "r2-009" and got["chosen_from"] == "round2.json"
    assert got["trials"] == 28 and len(got["all"]) == 28 and got["seconds"] == 280.0
    assert [r["file"] for r in got["rounds"]] == ["tuned.json", "round2.json"]
    # This round wins.
    got = tune_cpu.pool_rounds(entry(0.56, "r3-007", 12), "out/tuned.json", [("a/round2.json", earlier)], "DSRH", 48)
    assert got["trial"] == "r3-007" and got["chosen_from"] == "tuned.json" and got["trials"] == 28
    # Nothing pooled for this (method, bits): the round's own entry, unchanged.
    alone = entry(0.5, "r3-001", 12)
    assert tune_cpu.pool_rounds(alone, "out/tuned.json", [("a/round2.json", earlier)], "DSRH", 12) == alone
    # Rounds of different lengths are not comparable.
    with pytest.raises(SystemExit, match="different --steps"):
        tune_cpu.pool_rounds(entry(0.5, "x", 12, steps=900), "o.json", [("a/round2.json", earlier)], "DSRH", 48)


def test_report_plots_are_written(tmp_path):
    """report_cpu.plots writes the MAP-vs-bits and 48-bit PR figures (110 dpi: 8 x 5.5 and 7 x 5.5 inches)."""
    from PIL import Image

    curve = {"precision": [1.0, 0.8, 0.5], "recall": [0.1, 0.4, 1.0]}
    rows = [{"method": m, "bits": b, "seed": s, "map": 0.1 * (i + 1) + 0.01 * s, "pr_curve": curve}
            for i, m in enumerate(["ITQ", "DSRH"]) for b in (12, 48) for s in (0, 1)]
    report_cpu.plots(rows, tmp_path)
    with Image.open(tmp_path / "results_map_vs_bits.png") as im:
        assert im.size == (880, 605)
    with Image.open(tmp_path / "results_pr_48bits.png") as im:
        assert im.size == (770, 605)


def test_tune_protocol_takes_extra_overrides_last(tmp_path):
    """tune_cpu.py --override wins over the protocol's own settings too (trials' swept values come after)."""
    from dsrh_lightning.config import load_config

    args = _protocol_args(tmp_path)
    args.seed, args.override = 0, ["trainer.max_steps=7", "data.batch_size=32"]
    cfg = load_config(tune_cpu.protocol_overrides(args, 48))
    assert cfg.trainer.max_steps == 7 and cfg.data.batch_size == 32
    assert not any(o in results_cpu.base_overrides(args, 48, 0) for o in args.override)


def test_refine_sweep_searches_around_the_earlier_best():
    """--refine: categorical knobs fixed at the earlier best, log-uniform within x/÷2, uniform within a quarter of
    the range either side, both clipped to the file's bounds; a knob the earlier rounds lacked keeps its range.
    The result is a valid W&B sweep."""
    from sweeps import schema_violations_from_proposed_config

    sweep = {"method": "bayes", "metric": {"name": "best_val_map", "goal": "maximize"},
             "command": ["${env}", "dsrh", "train", "experiment=dsrh", "${args}"],
             "parameters": {"optim.lr": {"distribution": "log_uniform_values", "min": 0.003, "max": 0.3},
                            "loss.margin": {"distribution": "uniform", "min": 0.05, "max": 0.5},
                            "model.dropout": {"values": [0.0, 0.25, 0.5]},
                            "loss.triplet_average": {"values": ["all", "active"]}}}
    got = tune_cpu.refine_sweep(sweep, {"optim.lr": 0.2, "loss.margin": 0.1, "model.dropout": 0.25})
    assert got["parameters"]["optim.lr"] == {"distribution": "log_uniform_values", "min": 0.1, "max": 0.3}
    assert got["parameters"]["loss.margin"]["min"] == 0.05
    assert got["parameters"]["loss.margin"]["max"] == pytest.approx(0.1 + 0.1125)
    assert got["parameters"]["model.dropout"] == {"value": 0.25}
    assert got["parameters"]["loss.triplet_average"] == {"values": ["all", "active"]}
    assert got["command"] == sweep["command"] and sweep["parameters"]["optim.lr"]["min"] == 0.003  # input kept
    assert not schema_violations_from_proposed_config(got)


def test_rescore_chooses_by_mean_over_seeds_and_reuses_finished_runs(tmp_path):
    entry = {"overrides": ["experiment=dsrh", "optim.lr=0.1"], "best_val_map": 0.60, "trials": 4, "trial": "r2-003",
             "chosen_from": "round2.json",
             "all": [{"params": {"optim.lr": 0.1}, "best_val_map": 0.60},   # lucky seed 0
                     {"params": {"optim.lr": 0.2}, "best_val_map": 0.58},   # best on average
                     {"params": {"optim.lr": 0.3}, "best_val_map": 0.50},   # not among the top 2
                     {"params": {"optim.lr": 0.4}, "best_val_map": None}]}  # failed trial
    other_seeds = {"0.1": 0.50, "0.2": 0.57, "0.3": 0.9}
    calls = []

    def run_seed(overrides, seed):
        calls.append((overrides[-1], seed))
        return other_seeds[overrides[-1].split("=")[1]] - 0.01 * seed

    cache = tmp_path / "rescore.json"
    got = tune_cpu.rescore(entry, 2, [1, 2], run_seed, ["experiment=dsrh"], cache)
    assert got["overrides"] == ["experiment=dsrh", "optim.lr=0.2"] and got["best_val_map"] == 0.58
    assert "trial" not in got and "chosen_from" not in got  # they named the seed-0 best, not the choice
    assert got["mean_val_map"] == pytest.approx((0.58 + 0.56 + 0.55) / 3)
    assert [c["params"]["optim.lr"] for c in got["rescored"]] == [0.1, 0.2] and got["rescore_seeds"] == [1, 2]
    assert sorted(calls) == [("optim.lr=0.1", 1), ("optim.lr=0.1", 2), ("optim.lr=0.2", 1), ("optim.lr=0.2", 2)]
    # Run again (an interrupted rescoring resumed): every run comes from the cache.
    calls.clear()
    assert tune_cpu.rescore(entry, 2, [1, 2], run_seed, ["experiment=dsrh"], cache) == got and not calls
    # A candidate whose run failed is not chosen.
    got = tune_cpu.rescore(entry, 2, [1, 2], lambda o, s: None if "0.2" in o[-1] else 0.5, ["experiment=dsrh"],
                           tmp_path / "other.json")
    assert got["overrides"][-1] == "optim.lr=0.1" and got["trial"] == "r2-003"  # the seed-0 best kept its name


def test_rescore_cache_is_keyed_by_the_protocol_and_keeps_no_failed_run(tmp_path):
    entry = {"overrides": ["optim.lr=0.1"], "best_val_map": 0.6, "all": [{"params": {"optim.lr": 0.1}, "best_val_map": 0.6}]}
    calls = []

    def run_seed(overrides, seed):
        calls.append(seed)
        return None if len(calls) == 1 else 0.5  # the first run fails

    cache = tmp_path / "rescore.json"
    assert "mean_val_map" not in tune_cpu.rescore(entry, 1, [1], run_seed, [], cache, ["trainer.max_steps=1500"])
    got = tune_cpu.rescore(entry, 1, [1], run_seed, [], cache, ["trainer.max_steps=1500"])  # tried again
    assert got["mean_val_map"] == pytest.approx(0.55) and calls == [1, 1]
    tune_cpu.rescore(entry, 1, [1], run_seed, [], cache, ["trainer.max_steps=1500"])  # cached now
    assert calls == [1, 1]
    tune_cpu.rescore(entry, 1, [1], run_seed, [], cache, ["trainer.max_steps=900"])  # another protocol: runs
    assert calls == [1, 1, 1]


def test_refine_centre_prefers_a_rescored_choice():
    trials = [{"params": {"optim.lr": 0.1}, "best_val_map": 0.6}, {"params": {"optim.lr": 0.2}, "best_val_map": 0.58}]
    plain = {"overrides": ["optim.lr=0.1"], "best_val_map": 0.6, "all": trials}
    assert tune_cpu.refine_centre([plain]) == {"optim.lr": 0.1}
    chosen = dict(plain, overrides=["optim.lr=0.2"], mean_val_map=0.57,
                  rescored=[{"params": {"optim.lr": 0.1}, "overrides": ["optim.lr=0.1"], "mean_val_map": 0.55},
                            {"params": {"optim.lr": 0.2}, "overrides": ["optim.lr=0.2"], "mean_val_map": 0.57}])
    assert tune_cpu.refine_centre([plain, chosen]) == {"optim.lr": 0.2}
    assert tune_cpu.refine_centre([{"all": [{"params": {}, "best_val_map": None}]}]) is None


def test_rescore_seeds_must_differ_from_the_search_seed(tmp_path):
    with pytest.raises(SystemExit):
        tune_cpu.main(["--rescore", "2", "--seed", "1", "--rescore-seeds", "1", "2", "--out", str(tmp_path / "t.json")])


def test_alternatives_try_each_other_value_of_a_categorical_knob_on_the_same_seeds(tmp_path):
    sweep = {"parameters": {"data.sampling": {"values": ["triplets", "balanced"]},
                            "optim.lr": {"distribution": "log_uniform_values", "min": 0.01, "max": 0.1}}}
    fixed = ["experiment=dsrh"]
    chosen = {"params": {"data.sampling": "triplets", "optim.lr": 0.02},
              "overrides": fixed + ["data.sampling=triplets", "optim.lr=0.02"], "val_maps": [0.53, 0.52, 0.51],
              "mean_val_map": 0.52}
    entry = {"overrides": chosen["overrides"], "best_val_map": 0.53, "mean_val_map": 0.52, "trial": "r4-001",
             "rescored": [chosen], "rescore_seeds": [1, 2], "trials": 40}
    calls = []

    def run_seed(overrides, seed):
        calls.append((overrides[1], seed))
        return 0.54 + 0.01 * seed

    got = tune_cpu.alternatives(entry, sweep, ["data.sampling"], [0, 1, 2], run_seed, fixed, tmp_path / "c.json")
    assert calls == [("data.sampling=balanced", 0), ("data.sampling=balanced", 1), ("data.sampling=balanced", 2)]
    assert got["overrides"] == fixed + ["data.sampling=balanced", "optim.lr=0.02"]
    assert got["mean_val_map"] == pytest.approx(0.55) and got["best_val_map"] == pytest.approx(0.54)
    assert "trial" not in got and got["trials"] == 40 and got["alternatives"] == ["data.sampling"]
    assert [c.get("alternative") for c in got["rescored"]] == [None, "data.sampling"]
    # A worse variant leaves the choice (and its trial name) as it was; finished runs come from the cache.
    calls.clear()
    worse = tune_cpu.alternatives(entry, sweep, ["data.sampling"], [0, 1, 2], lambda o, s: 0.3, fixed,
                                  tmp_path / "w.json")
    assert worse["overrides"] == entry["overrides"] and worse["trial"] == "r4-001" and len(worse["rescored"]) == 2
    tune_cpu.alternatives(entry, sweep, ["data.sampling"], [0, 1, 2], run_seed, fixed, tmp_path / "c.json")
    assert not calls
    with pytest.raises(SystemExit, match="categorical"):
        tune_cpu.alternatives(entry, sweep, ["optim.lr"], [0, 1, 2], run_seed, fixed, tmp_path / "c.json")
    for seeds in ([0, 1], [0, 5, 6]):  # the choice was scored with seeds 0, 1, 2
        with pytest.raises(SystemExit, match="seeds"):
            tune_cpu.alternatives(entry, sweep, ["data.sampling"], seeds, run_seed, fixed, tmp_path / "c.json")
    # Again on its own output (now choosing the variant): the earlier setting is not added a second time.
    again = tune_cpu.alternatives(got, sweep, ["data.sampling"], [0, 1, 2], run_seed, fixed, tmp_path / "c.json")
    assert len(again["rescored"]) == 2 and again["overrides"] == got["overrides"]
    # A later --rescore rebuilds the candidates from the trials: the variant keys go with the variants.
    rescored = tune_cpu.rescore(dict(got, all=[{"params": chosen["params"], "best_val_map": 0.53}]), 1, [1, 2],
                                run_seed, fixed, tmp_path / "r.json")
    assert "alternatives" not in rescored
    with pytest.raises(SystemExit, match="re-scored"):
        tune_cpu.alternatives({"overrides": []}, sweep, ["data.sampling"], [0], run_seed, fixed, tmp_path / "c.json")


@pytest.mark.parametrize("argv, fragment", [
    (["--count", "0", "--pool", "x.json"], "--rescore K and/or --alternatives"),
    (["--count", "0", "--alternatives", "data.sampling"], "--rescore K and/or --alternatives"),
    (["--count", "0", "--pool", "x.json", "--rescore", "3", "--refine"], "--refine"),
    (["--count", "4", "--alternatives", "data.sampling"], "give --rescore K too"),
    (["--methods", "DRH"], "--protocol frozen tunes"),
])
def test_tune_cpu_rejects_flag_combinations_that_would_do_nothing_or_fail_late(tmp_path, capsys, argv, fragment):
    with pytest.raises(SystemExit):
        tune_cpu.main(argv + ["--out", str(tmp_path / "t.json")])
    assert fragment in capsys.readouterr().err


def test_rescore_keeps_an_earlier_rounds_candidates_scored_with_the_same_seeds(tmp_path):
    variant = {"params": {"optim.lr": 0.1, "data.sampling": "balanced"},
               "overrides": ["optim.lr=0.1", "data.sampling=balanced"], "val_maps": [0.56, 0.56, 0.56],
               "mean_val_map": 0.56, "alternative": "data.sampling"}  # no trial: --alternatives added it
    trial = {"params": {"optim.lr": 0.1}, "overrides": ["optim.lr=0.1"], "val_maps": [0.6, 0.5, 0.5],
             "mean_val_map": 1.6 / 3}
    earlier = {"overrides": variant["overrides"], "seed": 0, "rescore_seeds": [1, 2], "steps": 1500,
               "rescored": [trial, variant], "alternatives": ["data.sampling"]}
    assert tune_cpu.earlier_candidates([earlier], [0, 1, 2], 1500) == [trial, variant]
    assert tune_cpu.earlier_candidates([earlier], [0, 3, 4], 1500) == []  # other seeds: not comparable
    assert tune_cpu.earlier_candidates([earlier], [0, 1, 2], 3000) == []  # another schedule
    assert tune_cpu.earlier_candidates([{"overrides": []}], [0, 1, 2], 1500) == []  # never re-scored
    calls = []

    def run_seed(overrides, seed):
        calls.append((tuple(overrides), seed))
        return {"optim.lr=0.2": 0.55, "optim.lr=0.3": 0.40}[overrides[-1]]

    new_round = {"overrides": ["optim.lr=0.2"], "best_val_map": 0.62,
                 "all": [{"params": {"optim.lr": 0.2}, "best_val_map": 0.62},   # a new trial, lucky on seed 0
                         {"params": {"optim.lr": 0.1}, "best_val_map": 0.60},   # the earlier trial: not re-run
                         {"params": {"optim.lr": 0.3}, "best_val_map": 0.30}]}
    got = tune_cpu.rescore(new_round, 2, [1, 2], run_seed, [], tmp_path / "c.json",
                           earlier=tune_cpu.earlier_candidates([earlier], [0, 1, 2], 1500))
    assert sorted(calls) == [(("optim.lr=0.2",), 1), (("optim.lr=0.2",), 2)]
    # 0.2 scores (0.62 + 0.55 + 0.55) / 3 = 0.573 > the earlier variant's 0.56: the new trial wins ...
    assert got["overrides"] == ["optim.lr=0.2"] and got["mean_val_map"] == pytest.approx(1.72 / 3)
    assert len(got["rescored"]) == 3 and got["alternatives"] == ["data.sampling"]
    # ... and where it does not beat it, the earlier variant stays the choice.
    got = tune_cpu.rescore(dict(new_round, all=new_round["all"][1:]), 2, [1, 2], run_seed, [], tmp_path / "c.json",
                           earlier=[trial, variant])
    assert got["overrides"] == variant["overrides"] and got["mean_val_map"] == pytest.approx(0.56)


def test_sweep_fixed_records_the_commands_own_settings_not_the_protocols():
    command = ["${env}", "dsrh", "train", "dataset=cifar10", "experiment=dsrh", "model.backbone=efficientnet_lite0",
               "data.cache_features=true", "loss.orth_norm=bits", "${args}"]
    protocol = ["dataset=cifar10", "model.backbone=efficientnet_lite0", "data.cache_features=true", "seed=0"]
    assert tune_cpu.sweep_fixed(command, protocol) == ["dataset=cifar10", "experiment=dsrh", "loss.orth_norm=bits"]
    # The shipped tuning files record what they recorded before they spelled out the protocol's features.
    import argparse

    import yaml

    args = argparse.Namespace(dataset="cifar10", backbone="efficientnet_lite0", weights="imagenet", image_size=128,
                              feature_dir="f", data_root="", split_dir="", seed=0, steps=1500, val_every=500,
                              lr_decay_steps=1000, batch_size=64, override=[])
    sweep = yaml.safe_load((REPO / "experiments/sweeps/tune_dsrh.yaml").read_text())
    assert tune_cpu.sweep_fixed(sweep["command"], tune_cpu.protocol_overrides(args, 48)) == [
        "dataset=cifar10", "experiment=dsrh", "loss.margin_scaling=per_bit", "loss.orth_norm=bits"]


def _assert_holds_the_end_to_end_recipe(cfg):
    """``cfg`` has finetune_cpu_recipe.json's 48-bit DSRH settings but the lr (3 significant digits)."""
    import json

    recipe = json.loads((REPO / "benchmarks" / "results" / "finetune_cpu_recipe.json").read_text())["DSRH"]["48"]
    found = dict(o.split("=", 1) for o in recipe["overrides"])
    for key in ("experiment", "dataset", "optim.lr"):
        found.pop(key)
    for key, value in found.items():
        section, name = key.split(".")
        shipped = getattr(getattr(cfg, section), name)
        assert (shipped == value) if isinstance(shipped, str) else float(shipped) == pytest.approx(float(value), rel=5e-3), key


def test_shipped_dsrh_finetune_is_the_end_to_end_recipe():
    """experiment=dsrh_finetune holds finetune_cpu_recipe.json's 48-bit DSRH loss settings (3 significant digits)
    and the end-to-end protocol's training settings (benchmarks/finetune_cpu.py's defaults, the lr included)."""
    from benchmarks import finetune_cpu
    from dsrh_lightning.config import load_config

    cfg = load_config(["dataset=cifar10", "experiment=dsrh_finetune"])
    _assert_holds_the_end_to_end_recipe(cfg)
    args = finetune_cpu.build_parser().parse_args([])
    assert (cfg.data.image_size, cfg.model.train_blocks, cfg.trainer.max_steps) == (args.image_size, args.train_blocks, args.steps)
    assert (cfg.optim.lr, cfg.optim.lr_decay_steps, cfg.trainer.val_check_interval) == (args.lr, args.lr_decay_steps, args.val_every)
    assert cfg.data.cache_features and cfg.data.cache_flip and cfg.model.backbone == "efficientnet_lite0"


@pytest.mark.parametrize("dataset", ["cifar10", "nuswide", "synthetic"])
def test_default_dsrh_is_the_end_to_end_recipe_and_dsrh_yao_the_papers_constants(dataset):
    """experiment=dsrh (what make train runs) carries finetune_cpu_recipe.json's 48-bit DSRH loss settings on every
    dataset, with the sampling left to the labels; experiment=dsrh_yao keeps Yao et al.'s constants."""
    from dsrh_lightning.config import load_config

    cfg = load_config([f"dataset={dataset}", "experiment=dsrh"])
    _assert_holds_the_end_to_end_recipe(cfg)
    assert cfg.data.sampling == "auto" and cfg.loss.ranking == "triplet" and cfg.model.classifier
    paper = load_config([f"dataset={dataset}", "experiment=dsrh_yao"])
    assert (paper.loss.margin, paper.loss.margin_scaling, paper.loss.orth_weight, paper.loss.orth_norm,
            paper.loss.cls_weight, paper.loss.triplet_average, paper.data.sampling) == (
        1.0, "constant", 0.25, "none", 1.0, "all", "triplets")



def _sample(spec):
    """One value of a sweep parameter's specification (its first listed value, or its lower bound)."""
    return spec["values"][0] if "values" in spec else spec.get("value", spec.get("min"))


def _finetune_args(**kw):
    import argparse

    return argparse.Namespace(**dict(dict(steps=1500, val_every=500, lr_decay_steps=1000, seed=3, override=[]), **kw))


def test_finetune_sweep_searches_each_methods_loss_knobs_lr_and_backbone_multiplier():
    """The end-to-end space (pure): the method's loss knobs less the ablated terms, dropout, the lr and the
    backbone's multiplier; the frozen protocol's network knobs are left to the protocol."""
    import copy

    from dsrh_lightning.runs.sweep_local import load_sweep, resolve_sweep_path

    dsrh = load_sweep(resolve_sweep_path("tune_dsrh.yaml"))
    before = copy.deepcopy(dsrh)
    drh = tune_cpu.finetune_sweep(dsrh, "drh", ["loss.cls_weight", "loss.orth_weight"])
    assert dsrh == before  # the frozen sweep is not changed
    assert set(drh["parameters"]) == {"optim.lr", "optim.backbone_lr_mult", "loss.margin", "loss.triplet_average",
                                      "model.dropout"}
    assert "experiment=drh" in drh["command"] and "experiment=dsrh" not in drh["command"]
    assert drh["parameters"]["optim.lr"] == tune_cpu.FINETUNE_SHARED["optim.lr"]
    plus = tune_cpu.finetune_sweep(dsrh, "drh_plus", ["loss.cls_weight"])
    assert set(plus["parameters"]) == set(drh["parameters"]) | {"loss.orth_weight"}


@pytest.mark.parametrize("method", sorted(tune_cpu.FINETUNE_SWEEPS))
def test_every_end_to_end_search_makes_valid_runs_of_the_finetune_protocol(method):
    """Each method's end-to-end trial (sweep command, protocol, a value of every knob) is a valid config of the
    right method, with finetune_cpu.py's network and batches and the trial's own lr."""
    from dsrh_lightning.config import load_config
    from dsrh_lightning.runs.sweep_local import load_sweep, resolve_sweep_path

    name, experiment, drop = tune_cpu.FINETUNE_SWEEPS[method]
    sweep = tune_cpu.finetune_sweep(load_sweep(resolve_sweep_path(name)), experiment, drop)
    protocol = tune_cpu.protocol_overrides(_finetune_args(protocol="finetune"), 48)
    fixed = tune_cpu.sweep_fixed(sweep["command"], protocol)
    assert f"experiment={experiment}" in fixed
    params = {k: _sample(v) for k, v in sweep["parameters"].items()}
    cfg = load_config(fixed + protocol + [f"{k}={v}" for k, v in params.items()])
    assert cfg.experiment == experiment and cfg.optim.lr == pytest.approx(tune_cpu.FINETUNE_SHARED["optim.lr"]["min"])
    assert cfg.optim.backbone_lr_mult == pytest.approx(0.1) and cfg.model.bits == 48 and cfg.seed == 3
    assert (cfg.data.image_size, cfg.model.train_blocks, cfg.data.cache_flip, cfg.data.sampling) == (96, 3, True, "balanced")
    assert not cfg.trainer.test_after_fit and not any(o.startswith(("optim.lr=", "output_dir=")) for o in protocol)


def test_finetune_protocol_is_finetune_cpus_run_less_method_lr_and_folder():
    from benchmarks import finetune_cpu

    protocol = tune_cpu.finetune_protocol(_finetune_args(override=["trainer.max_steps=20"]), 12)
    run = finetune_cpu.run_overrides(finetune_cpu.build_parser().parse_args([]), "DSRH", 12, 3, {})
    own = {"experiment", "optim.lr", "optim.backbone_lr_mult", "output_dir", "name", "resume",
           "trainer.test_after_fit", "logger.name"}
    assert [o for o in run if o.split("=", 1)[0] not in own] == protocol[:len(run) - len(own)]
    assert protocol[-1] == "trainer.max_steps=20"  # --override last


def test_a_search_that_reached_its_count_is_read_not_run_again(tmp_path, monkeypatch):
    """``--count N`` over a sweep folder that already holds N trials (a finished search continued for other
    methods) runs nothing and returns the best of those trials; one more in --count runs exactly one."""
    import argparse
    import json as _json

    sweep_dir = tmp_path / "dhn-12"
    sweep_dir.mkdir()
    runs = [{"name": f"t-{i:03d}", "state": "finished", "config": {"optim.lr": {"value": lr}},
             "history": [{"best_val_map": m}]} for i, (lr, m) in enumerate([(0.01, 0.50), (0.02, 0.53)])]
    (sweep_dir / "sweep_state.json").write_text(_json.dumps({"sweep_file": "x.yaml", "runs": runs}))
    asked = []
    monkeypatch.setattr(tune_cpu, "run_sweep_local", lambda *a, count, **k: asked.append(count))
    monkeypatch.setattr(tune_cpu, "protocol_overrides", lambda args, bits: [])
    args = argparse.Namespace(count=2, refine=False, seed=0, steps=1500, out=str(tmp_path / "out.json"))
    entry = tune_cpu.search_round(args, "DHN", 12, {}, Path("tune_dhn.yaml"), ["experiment=dhn"], sweep_dir, [])
    assert asked == [] and entry["trials"] == 2 and entry["trial"] == "t-001"
    assert entry["overrides"] == ["experiment=dhn", "optim.lr=0.02"]
    tune_cpu.search_round(argparse.Namespace(**dict(vars(args), count=3)), "DHN", 12, {}, Path("tune_dhn.yaml"),
                          ["experiment=dhn"], sweep_dir, [])
    assert asked == [1]


def test_a_rescore_run_left_half_done_continues_instead_of_failing_on_its_folder(tmp_path):
    """A stopped re-scoring leaves a run folder without a finished run; the same candidate and seed run again
    (the cache keeps no failed run) must claim that folder, not fail and drop the candidate."""
    from dsrh_lightning.config import load_config
    from dsrh_lightning.errors import RunFolderError
    from dsrh_lightning.runs.folders import claim_run_folder, resolve_run

    overrides = tune_cpu.rescore_run(["experiment=dsrh", "optim.lr=0.02"], ["dataset=synthetic", "seed=1"],
                                     tmp_path, "rescore-abc-seed1")
    cfg = load_config(overrides)
    run_dir = tmp_path / "rescore" / "rescore-abc-seed1"
    assert (cfg.resume, cfg.optim.lr, cfg.seed) == ("auto", 0.02, 1)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 1\n")  # killed before its first checkpoint
    folder, resume = resolve_run(cfg)
    assert folder == run_dir and resume is None
    lock, _ = claim_run_folder(cfg, folder, resume)
    lock.release()
    # The same folder without resume=auto is refused: the failure this guards against.
    with pytest.raises(RunFolderError, match="already holds a run"):
        claim_run_folder(load_config(overrides[:-1]), run_dir, None)


def test_a_search_stopped_with_its_checkout_continues_from_the_kept_trials(tmp_path, monkeypatch):
    """A search killed during its third trial, whose ``runs/`` folder is then gone (a fresh checkout), continues
    from the trial records kept in ``--keep-dir``: it runs only the missing trials, and they are the trials an
    uninterrupted search proposes (same params, same order); the entry counts every trial's seconds."""
    import argparse
    import json
    import math

    sweep_file = tmp_path / "tune_toy.yaml"
    sweep_file.write_text(
        "method: bayes\nmetric: {name: best_val_map, goal: maximize}\n"
        "command:\n  - ${env}\n  - dsrh\n  - train\n  - experiment=dhn\n  - ${args}\n"
        "parameters:\n  optim.lr: {distribution: log_uniform_values, min: 0.001, max: 0.1}\n"
        "  model.dropout: {values: [0.0, 0.25, 0.5]}\n")
    sweep = tune_cpu.load_sweep(sweep_file)
    ran = []

    def fake_train(overrides, out_dir, name):
        params = dict(o.lstrip("-").split("=", 1) for o in overrides if o.startswith(("--optim.lr=", "--model.dropout=")))
        if len(ran) == stop_at:
            raise KeyboardInterrupt  # the session ends during this trial
        ran.append((out_dir.parents[1].name, params))
        lr, drop = float(params["optim.lr"]), float(params["model.dropout"])
        return 0, {"best_val_map": 0.6 - abs(math.log10(lr) + 1.5) / 10 - drop / 10}

    monkeypatch.setattr(tune_cpu, "train_in_process", fake_train)
    monkeypatch.setattr(tune_cpu, "protocol_overrides", lambda args, bits: [])

    def search(checkout, keep, count=4):
        args = argparse.Namespace(count=count, refine=False, seed=0, steps=1500, keep_dir=str(keep),
                                  out=str(tmp_path / "out.json"))
        return tune_cpu.search_round(args, "DHN", 48, sweep, sweep_file, ["experiment=dhn"],
                                     tmp_path / checkout / "runs" / "dhn-48", [])

    stop_at = None
    whole = search("uninterrupted", tmp_path / "keep_whole")
    proposals = [p for _, p in ran]
    assert len(proposals) == 4 and len({p["optim.lr"] for p in proposals}) == 4
    ran.clear()
    stop_at = 2
    with pytest.raises(KeyboardInterrupt):
        search("first", tmp_path / "keep")
    kept = tmp_path / "keep" / "dhn-48.json"
    assert [r["name"] for r in json.loads(kept.read_text())["runs"]] == ["tune_toy-000", "tune_toy-001"]
    ran.clear()
    stop_at = None
    entry = search("second", tmp_path / "keep")  # a fresh checkout: no runs/ folder of the first
    assert [p for _, p in ran] == proposals[2:]
    assert {c for c, _ in ran} == {"second"}
    assert entry["trials"] == 4 and entry["all"] == whole["all"] and entry["trial"] == whole["trial"]
    assert len(json.loads(kept.read_text())["runs"]) == 4
    runs = json.loads(kept.read_text())["runs"]
    assert entry["seconds"] == round(sum(r["seconds"] for r in runs), 1)


def _row(method="DSRH", bits=48, seed=0, steps=1500, lr=0.01, mult=1.0, val=0.6, extra=()):
    return {"method": method, "bits": bits, "seed": seed, "steps": steps, "lr": lr, "backbone_lr_mult": mult,
            "best_val_map": val,
            "overrides": ["dataset=cifar10", "experiment=dsrh", "loss.margin=0.38", *extra, "model.bits=48",
                          "seed=0", f"optim.lr={lr}", f"optim.backbone_lr_mult={mult}", "trainer.test_after_fit=true",
                          "logger.name=csv", "output_dir=/r", "name=n", "resume=auto", "data.cache_flip=true"]}


def test_an_end_to_end_search_starts_from_the_methods_untuned_run():
    """The start is the last untuned run (default lr and multiplier) of (method, bits, seed, steps); its settings
    are its dataset, experiment and method knobs (not the protocol's or its run's); it becomes the choice only
    when it validates better than the search's best trial, and is recorded either way."""
    rows = [_row(val=0.5), _row(lr=0.05, val=0.9), _row(mult=0.3, val=0.9), _row(seed=1, val=0.9),
            _row(steps=500, val=0.9), _row(bits=12, val=0.9), _row(method="DRH", val=0.9), _row(val=0.66)]
    row = tune_cpu.start_row(rows, "DSRH", 48, 0, 1500, 0.01, 1.0)
    assert row is rows[-1]
    assert tune_cpu.start_row(rows, "DSRH", 24, 0, 1500, 0.01, 1.0) is None
    protocol = ["dataset=cifar10", "model.bits=48", "seed=0", "data.cache_flip=true", "trainer.test_after_fit=false"]
    settings = ["dataset=cifar10", "experiment=dsrh", "loss.margin=0.38", "optim.lr=0.01", "optim.backbone_lr_mult=1.0"]
    assert tune_cpu.start_settings(row, protocol) == settings
    searched = {"overrides": ["dataset=cifar10", "experiment=dsrh", "optim.lr=0.05"], "best_val_map": 0.6,
                "trial": "t-003", "trials": 6}
    chosen = tune_cpu.with_start(searched, row, protocol, "f.jsonl")
    assert (chosen["overrides"], chosen["best_val_map"], chosen["trial"], chosen["trials"]) == (settings, 0.66, "start", 6)
    assert chosen["start"] == {"file": "f.jsonl", "best_val_map": 0.66, "overrides": settings}
    kept = tune_cpu.with_start(dict(searched, best_val_map=0.7), row, protocol, "f.jsonl")
    assert (kept["overrides"], kept["trial"], kept["start"]["best_val_map"]) == (searched["overrides"], "t-003", 0.66)


def test_the_finetune_protocol_covers_every_run_setting_of_the_recorded_untuned_rows():
    """Each untuned seed-0 row of finetune_cpu.jsonl, less the end-to-end protocol, leaves only method settings:
    the start candidate carries no data path, schedule or run folder of the machine that made it."""
    from benchmarks.results_cpu import load_results

    rows = [r for r in load_results(REPO / "benchmarks" / "results" / "finetune_cpu.jsonl")
            if r["seed"] == 0 and r["lr"] == 0.01 and r["backbone_lr_mult"] == 1.0]
    assert rows
    for row in rows:
        args = _finetune_args(seed=0, data_root="/data", split_dir="/splits", feature_dir="/features")
        settings = tune_cpu.start_settings(row, tune_cpu.finetune_protocol(args, row["bits"]))
        keys = [o.split("=", 1)[0] for o in settings]
        assert keys[:2] == ["dataset", "experiment"], row["method"]
        assert all(k.split(".")[0] in ("loss", "model", "optim") for k in keys[2:]), (row["method"], keys)
        assert {"optim.lr", "optim.backbone_lr_mult"} <= set(keys) and "model.bits" not in keys


def test_a_finetune_search_without_its_start_runs_says_which_to_run_first(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json_line(_row()) + json_line(_row(method="DRH", bits=48)))
    with pytest.raises(SystemExit):
        tune_cpu.main(["--protocol", "finetune", "--methods", "DSRH", "DRH", "--bits", "12", "48", "--count", "1",
                       "--start", str(rows), "--out", str(tmp_path / "o.json"), "--sweep-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert "DSRH at 12 bits, DRH at 12 bits" in err and "48 bits" not in err.split("run of ")[1].split(":")[0]
    assert not (tmp_path / "s").exists()


def json_line(row):
    import json

    return json.dumps(row) + "\n"
