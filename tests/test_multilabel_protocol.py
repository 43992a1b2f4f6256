"""The multi-label benchmark's plumbing (benchmarks/multilabel_cpu.py): every method's settings load as a valid
multi-label config, the validation search picks by validation MAP only, and the RESULTS.md block reports
mean and spread per method."""

import json
import statistics
from types import SimpleNamespace

import pytest

from benchmarks import multilabel_cpu
from dsrh_lightning.config import load_config


def _args(tmp_path, **kw):
    args = dict(dataset="cifar10_multilabel", data_root=str(tmp_path / "data"), split_dir=str(tmp_path / "splits"),
                backbone="efficientnet_lite0", weights="imagenet", image_size=128, feature_dir=str(tmp_path / "f"),
                steps=1000, val_every=500, lr_decay_steps=700, batch_size=64, override=[])
    args.update(kw)
    return SimpleNamespace(**args)


@pytest.mark.parametrize("method", list(multilabel_cpu.DEEP))
def test_every_deep_method_is_a_valid_multilabel_run_on_cached_features(tmp_path, method):
    cfg = load_config(multilabel_cpu.deep_overrides(_args(tmp_path), method, 48, 1, 0.03, str(tmp_path / "runs")))
    assert cfg.data.dataset == "cifar10_multilabel" and cfg.data.cache_features
    assert cfg.optim.lr == 0.03 and cfg.model.bits == 48 and cfg.seed == 1 and cfg.data.protocol.seed == 1
    # the protocol's NUS-WIDE conventions and tie handling, whatever the experiment file says
    assert (cfg.eval.topk, cfg.eval.ndcg_k, cfg.eval.acg_k, cfg.eval.wmap_topk) == (5000, 100, 100, 5000)
    assert cfg.eval.ties == "stable" and not cfg.trainer.test_after_fit


def test_the_two_dsrh_variants_differ_only_in_the_ranking_loss_and_its_sampling(tmp_path):
    a = load_config(multilabel_cpu.deep_overrides(_args(tmp_path), "DSRH (triplet)", 48, 0, 0.01, "r"))
    b = load_config(multilabel_cpu.deep_overrides(_args(tmp_path), "DSRH (Zhao)", 48, 0, 0.01, "r"))
    assert (a.loss.ranking, b.loss.ranking) == ("triplet", "weighted")
    assert (a.data.sampling, b.data.sampling) == ("triplets", "random")
    assert a.model.classifier and b.model.classifier
    assert (a.loss.orth_weight, a.loss.cls_weight) == (b.loss.orth_weight, b.loss.cls_weight)


def test_override_wins_over_the_method_settings(tmp_path):
    over = multilabel_cpu.deep_overrides(_args(tmp_path, override=["loss.orth_weight=0.5"]), "DSRH (triplet)", 12, 0,
                                         0.01, "r")
    assert load_config(over).loss.orth_weight == 0.5


def test_choose_takes_the_best_validation_map_and_the_first_on_ties():
    trials = [dict(lr=0.003, best_val_map=0.4), dict(lr=0.01, best_val_map=0.6), dict(lr=0.03, best_val_map=0.6)]
    assert multilabel_cpu.choose(trials)["lr"] == 0.01
    assert multilabel_cpu.choose(trials[:1])["lr"] == 0.003


def _row(method, bits, seed, ndcg, lr=0.01):
    return dict(method=method, bits=bits, seed=seed, lr=lr, map=ndcg - 0.1, ndcg=ndcg, acg=2 * ndcg, wmap=ndcg / 2,
                precision_r2=0.3, commit="abc", machine="m", date=f"2026-12-0{seed + 1}T00:00:00")


def test_report_gives_mean_and_spread_per_method_best_ndcg_first():
    rows = [_row("HashNet", 48, s, v) for s, v in enumerate([0.5, 0.6, 0.7])]
    rows += [_row("DSRH (Zhao)", 48, s, v) for s, v in enumerate([0.7, 0.8, 0.9])]
    rows += [_row("ITQ", 12, 0, 0.2, lr=None)]
    tuned = {"HashNet": {"bits": 48, "lr": 0.01, "trials": [dict(lr=0.01, best_val_map=0.52),
                                                            dict(lr=0.003, best_val_map=0.41)]},
             "CSQ": {"bits": 48, "lr": 0.03, "trials": [dict(lr=0.03, best_val_map=0.6)]}}
    block = multilabel_cpu.report(rows, tuned, "`x.jsonl`")
    assert block[0] == multilabel_cpu.BEGIN and block[-1] == multilabel_cpu.END
    text = "\n".join(block)
    assert text.index("**12 bits**") < text.index("**48 bits**")
    assert text.index("| DSRH (Zhao) |") < text.index("| HashNet |")  # 0.8 NDCG before 0.6
    sd = statistics.stdev([0.7, 0.8, 0.9])
    assert f"| DSRH (Zhao) | 0.01 | 3 | {0.7:.3f} ± {sd:.3f} | {0.8:.3f} ± {sd:.3f} |" in text
    assert "| ITQ | - | 1 | 0.100 | 0.200 |" in text
    assert "| method | bits | lr 0.003 | lr 0.01 | lr 0.03 | chosen |" in text  # columns by lr, whatever the order tried
    assert "| HashNet | 48 | 0.4100 | 0.5200 | - | 0.01 |" in text and "| CSQ | 48 | - | - | 0.6000 | 0.03 |" in text


def test_report_without_rows_says_how_to_measure():
    assert "multilabel_cpu" in "\n".join(multilabel_cpu.report([], {}, "x"))


def test_compare_refuses_an_untuned_deep_method(tmp_path):
    args = _args(tmp_path, results=str(tmp_path / "r.jsonl"), tuned=str(tmp_path / "none.json"), seeds=[0],
                 bits=[48], methods=["HashNet"])
    with pytest.raises(SystemExit, match="no tuned lr"):
        multilabel_cpu.compare(args)


def test_tune_skips_learning_rates_already_tried(tmp_path, monkeypatch):
    tuned = tmp_path / "t.json"
    tuned.write_text(json.dumps({"CSQ": {"bits": 48, "lr": 0.01, "trials": [dict(lr=0.01, best_val_map=0.5)]}}))
    ran = []

    def fake_run(args, method, bits, seed, lr, dm, test):
        ran.append((method, lr, seed, test))
        return dict(best_val_map=0.7 if lr == 0.03 else 0.1, train_seconds=1.0)

    monkeypatch.setattr(multilabel_cpu, "run_deep", fake_run)
    monkeypatch.setattr(multilabel_cpu, "data_module", lambda *a: None)
    args = _args(tmp_path, tuned=str(tuned), methods=["CSQ", "ITQ"], lrs=[0.01, 0.03], tune_bits=48)
    multilabel_cpu.tune(args)
    assert ran == [("CSQ", 0.03, 0, False)]  # ITQ has no lr; 0.01 was tried already
    assert json.loads(tuned.read_text())["CSQ"]["lr"] == 0.03
