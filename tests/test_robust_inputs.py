"""Inputs at the edges: run names that are paths, YAML alias bombs against long plain lists."""

from __future__ import annotations

import time

import pytest

from dsrh_lightning import config as config_lib
from dsrh_lightning.config import ConfigError, load_config


@pytest.mark.parametrize("name", ["../x", "/abs/path", "a/b", "..", ".", "a\\b"])
def test_run_names_that_are_paths_are_refused(name):
    with pytest.raises(ConfigError, match="name=.*a run name is a folder name"):
        load_config(["dataset=synthetic", f"name={name}"])


@pytest.mark.parametrize("name", ["seq", "cifar10-dsrh-48b-s0-20260101-120000", "run.v2", "a_b"])
def test_plain_run_names_are_accepted(name):
    assert load_config(["dataset=synthetic", f"name={name}"]).name == name


def _bomb(levels: int, width: int = 10) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def _expanded_extra(levels: int, width: int = 10) -> int:
    """Nodes the aliases add, counted the slow way: expand the loaded data and count every node."""
    import yaml

    def count(x):
        if isinstance(x, dict):
            return 1 + sum(count(k) + count(v) for k, v in x.items())
        if isinstance(x, list):
            return 1 + sum(count(v) for v in x)
        return 1

    data = yaml.safe_load(_bomb(levels, width))
    unique = 1 + 2 * levels + 10  # the root, a key and a sequence per level, a0's 10 scalars
    return count(data) - unique


def test_alias_bomb_is_refused_fast(tmp_path):
    f = tmp_path / "bomb.yaml"
    f.write_text(_bomb(9))  # about 10**9 nodes once expanded
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"{f}: YAML aliases"):
        load_config(["dataset=synthetic"], config_files=[f])
    assert time.monotonic() - start < 10


def test_alias_count_matches_an_expanded_count(tmp_path, monkeypatch):
    f = tmp_path / "small.yaml"
    f.write_text(_bomb(3))  # 10 + 100 + 1000 expanded scalars: small enough to expand here
    extra = _expanded_extra(3)
    monkeypatch.setattr(config_lib, "MAX_ALIAS_NODES", extra)
    config_lib._check_aliases(f)  # exactly at the limit: accepted
    monkeypatch.setattr(config_lib, "MAX_ALIAS_NODES", extra - 1)
    with pytest.raises(ConfigError, match=f"by {extra} more"):
        config_lib._check_aliases(f)


def test_long_plain_list_and_small_anchors_load(tmp_path):
    f = tmp_path / "long.yaml"
    f.write_text("eval:\n  precision_at: [" + ", ".join(str(k) for k in range(1, 20_001)) + "]\n")
    cfg = load_config(["dataset=synthetic"], config_files=[f])
    assert len(cfg.eval.precision_at) == 20_000 and cfg.eval.precision_at[-1] == 20_000
    g = tmp_path / "anchors.yaml"
    g.write_text("data: &d\n  batch_size: 32\nmodel:\n  bits: 16\n")
    assert load_config(["dataset=synthetic"], config_files=[g]).data.batch_size == 32
