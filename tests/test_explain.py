"""`dsrh config --explain KEY` (meaning, type, default, allowed values from the schema) and `dsrh show ID`."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dsrh_lightning import cli


def test_explain_reads_the_schema_comment_type_default_and_choices(capsys):
    assert cli.main(["config", "--explain", "data.sampling"]) == 0
    out = capsys.readouterr().out
    assert "class-balanced batches, all valid triplets mined inside the batch" in out  # the comment in config.py
    assert "type:    str" in out and "default: 'triplets'" in out
    assert "allowed: 'triplets', 'balanced', 'random'" in out
    assert cli.main(["config", "--explain", "loss.ranking"]) == 0
    out = capsys.readouterr().out
    from dsrh_lightning.losses.registry import ranking_names

    assert all(repr(n) in out for n in ranking_names())  # from the registry, as validation reads it
    assert cli.main(["config", "--explain", "model.bits"]) == 0
    out = capsys.readouterr().out
    assert "type:    int" in out and "default: 48" in out and "allowed: > 0" in out


def test_explain_a_section_lists_its_keys(capsys):
    assert cli.main(["config", "--explain", "data.protocol"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("data.protocol: How images are split into query / train / validation / database sets")
    for key in ("query_per_class", "train_per_class", "val_per_class", "val_database_size", "seed"):
        assert f"data.protocol.{key}" in out


def test_every_key_of_the_schema_is_explained_and_an_unknown_one_is_refused(capsys):
    from omegaconf import OmegaConf

    from dsrh_lightning.cli.explain import all_keys, explain
    from dsrh_lightning.config import Config

    def leaves(node, prefix=""):
        for k in node:
            v = node[k]
            if OmegaConf.is_dict(v):
                yield prefix + k
                yield from leaves(v, prefix + k + ".")
            else:
                yield prefix + k

    assert sorted(leaves(OmegaConf.structured(Config))) == all_keys()
    for key in all_keys():
        assert explain(key).startswith(key)
    assert cli.main(["config", "--explain", "model.bitz"]) == 2
    err = capsys.readouterr().err
    assert "model.bitz" in err and "did you mean model.bits" in err


def test_show_writes_the_image_behind_an_in_memory_id(tmp_path, capsys):
    from dsrh_lightning.data.sources import make_synthetic

    out = tmp_path / "img.png"
    assert cli.main(["show", "synthetic#37", "data.synthetic_per_class=40", "--out", str(out)]) == 0
    src = make_synthetic(10, 40, 32, seed=0)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), src.images[37])
    assert f"label {src.class_names[src.labels[37]]}" in capsys.readouterr().out
    assert cli.main(["show", "synthetic#400", "data.synthetic_per_class=40", "--out", str(out)]) == 2
    assert "no image 400 in synthetic (400 images, 0..399)" in capsys.readouterr().err
    assert cli.main(["show", "nothing-here", "--out", str(out)]) == 2
    assert "neither an image file nor an id" in capsys.readouterr().err
