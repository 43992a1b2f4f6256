"""benchmarks/index_throughput runs at its tiny default size and reports both passes on the same items."""

from __future__ import annotations

from benchmarks import index_throughput


def test_tiny_run_reports_index_and_model_only(capsys):
    res = index_throughput.main(["--repeats", "1", "--batch-size", "50", "--model-batches", "3",
                                 "--tiny-per-class", "30"])
    assert res["dsrh_index"]["images"] == 10 * 30 - 10 * 2  # the database: all but the queries
    assert res["model_only"]["images"] == 150  # three batches of 50
    assert res["dsrh_index"]["images_per_s"] > 0 and res["model_only"]["images_per_s"] > 0
    assert res["ratio"] == round(res["dsrh_index"]["images_per_s"] / res["model_only"]["images_per_s"], 3)
    assert '"ratio"' in capsys.readouterr().out
