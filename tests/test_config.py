import pytest
from omegaconf import OmegaConf

from dsrh_lightning.config import ConfigError, load_config, normalise_overrides, save_config


def test_defaults_are_paper_constants():
    cfg = load_config([])
    assert cfg.model.backbone == "vgg19" and cfg.model.bag_size == 30
    assert cfg.loss.margin == 1.0 and cfg.loss.orth_weight == 0.25
    assert cfg.optim.lr == 0.01 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 2e-4
    assert cfg.optim.lr_decay_steps == 5000 and cfg.optim.lr_decay == 0.1 and cfg.data.batch_size == 64
    assert cfg.eval.threshold == 0.5


def test_wandb_agent_form_equals_plain_form():
    a = load_config(["dataset=synthetic", "model.bits=24", "optim.lr=0.05"])
    b = load_config(["--dataset=synthetic", "--model.bits=24", "--optim.lr", "0.05"])
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b)
    assert b.model.bits == 24 and b.optim.lr == 0.05


def test_dataset_and_experiment_files_are_layered():
    cfg = load_config(["dataset=synthetic", "experiment=drh"])
    assert cfg.model.backbone == "small_cnn"  # from dataset/synthetic.yaml
    assert cfg.loss.orth_weight == 0.0 and cfg.loss.cls_weight == 0.0  # from experiment/drh.yaml
    cfg = load_config(["dataset=synthetic", "experiment=drh", "loss.orth_weight=0.5"])
    assert cfg.loss.orth_weight == 0.5  # command line wins


@pytest.mark.parametrize("override, fragment", [
    ("modle.bits=3", "modle"),
    ("model.bitz=3", "model.bitz"),
    ("model.bits=abc", "model.bits"),
    ("model.bits=0", "model.bits"),
    ("model.backbone=vgg11", "model.backbone"),
    ("loss.orth_norm=frob", "loss.orth_norm"),
    ("dataset=imagenet", "dataset=imagenet"),
    ("experiment=nope", "experiment=nope"),
    ("data.sampling=balanced", "data.batch_size"),  # 64 with images_per_class=8 is fine; 60 is not
])
def test_bad_keys_and_values_name_the_key(override, fragment):
    extra = ["data.batch_size=60"] if override.startswith("data.sampling") else []
    with pytest.raises(ConfigError) as err:
        load_config([override] + extra)
    assert fragment in str(err.value)


@pytest.mark.parametrize("text, fragment", [
    ("model:\n  bitss: 12\n", "bitss"),                       # a misspelled key is named
    ("- model.bits=12\n- seed=3\n", "top level is a list"),   # a list instead of a mapping
], ids=["misspelled-key", "top-level-list"])
def test_bad_yaml_file_names_file_and_problem(tmp_path, text, fragment):
    f = tmp_path / "x.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config([], config_files=[f])
    assert str(f) in str(err.value) and fragment in str(err.value)


def test_override_without_value_is_an_error():
    with pytest.raises(ConfigError):
        normalise_overrides(["--model.bits"])
    with pytest.raises(ConfigError):
        normalise_overrides(["model.bits"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["dataset=synthetic", "model.bits=32"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config([], config_files=[tmp_path / "config.yaml"])
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_empty_value_is_empty_string():
    cfg = load_config(["data.split_dir=", "--logger.entity="])
    assert cfg.data.split_dir == "" and cfg.logger.entity == ""


@pytest.mark.parametrize("override, fragment", [
    ("trainer.devices=abc", "trainer.devices='abc'"),
    ("trainer.devices=0", "trainer.devices"),
    ("optim.lr=nan", "optim.lr=nan"),
    ("optim.lr=inf", "optim.lr=inf"),
    ("optim.lr=-inf", "optim.lr=-inf"),
    ("loss.margin=nan", "loss.margin=nan"),
    ("eval.threshold=nan", "eval.threshold=nan"),
    ("data.mean=[0.5,nan,0.5]", "data.mean[1]=nan"),
    ("seed=-1", "seed=-1"),
    ("seed=4294967296", "seed=4294967296"),
    ("data.protocol.seed=-3", "data.protocol.seed=-3"),
    ("optim.momentum=-1", "optim.momentum"),
    ("optim.momentum=1.5", "optim.momentum"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(["dataset=synthetic", override])
    assert fragment in str(err.value)


def test_every_schema_float_rejects_non_finite_values():
    """Walk the schema: each float field (present and future ones) refuses nan and inf."""
    cfg = load_config(["dataset=synthetic"])
    keys = []

    def walk(node, prefix):
        for k in node.keys():
            v, key = node[k], f"{prefix}{k}"
            if OmegaConf.is_dict(v):
                walk(v, key + ".")
            elif isinstance(v, float):
                keys.append(key)

    walk(cfg, "")
    assert "optim.lr" in keys and "loss.margin" in keys
    for key in keys:
        for bad in ("nan", "inf"):
            with pytest.raises(ConfigError, match=f"{key}={bad}"):
                load_config(["dataset=synthetic", f"{key}={bad}"])


def test_max_steps_minus_one_needs_max_epochs():
    cfg = load_config(["dataset=synthetic", "trainer.max_steps=-1", "trainer.max_epochs=2"])
    assert cfg.trainer.max_steps == -1 and cfg.trainer.max_epochs == 2
    with pytest.raises(ConfigError, match="max_epochs"):
        load_config(["dataset=synthetic", "trainer.max_steps=-1", "trainer.max_epochs=-1"])
    with pytest.raises(ConfigError, match="trainer.max_epochs=0"):
        load_config(["dataset=synthetic", "trainer.max_epochs=0"])


@pytest.mark.parametrize("value, parsed", [("auto", "auto"), ("2", 2), ("-1", -1), ("0,1", "0,1"), ("1,", "1,")])
def test_parse_devices_accepts_lightning_forms(value, parsed):
    from dsrh_lightning.config import parse_devices

    assert load_config([f"trainer.devices={value}"]).trainer.devices == value
    assert parse_devices(value) == parsed



def test_yaml_syntax_error_keeps_line_and_column(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  bits: 12\n  backbone: 'vgg19\noptim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config([], config_files=[f])
    # The unclosed quote opens on line 3, column 13; PyYAML reports where the scan found the problem.
    import yaml

    try:
        yaml.safe_load(f.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
    assert f"{f}:{mark.line + 1}:{mark.column + 1}:" in str(err.value)


def test_empty_yaml_file_is_accepted(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing yet\n")
    assert load_config(["seed=4"], config_files=[f]).seed == 4


def test_cli_bad_config_exits_2_without_traceback(tmp_path):
    import subprocess
    import sys

    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    for args in (["trainer.devices=abc"], ["--config", str(f)], ["optim.lr=nan"], ["trainer.max_steps=0"]):
        proc = subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", "train", "dataset=synthetic", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr


@pytest.mark.parametrize("overrides, fragment", [
    (["data.sampling=triplets", "loss.triplet_mining=hard"], "data.sampling=balanced"),
    (["data.sampling=balanced", "data.max_triplets=100", "loss.triplet_mining=semihard"], "data.max_triplets=0"),
    (["loss.triplet_mining=hardest"], "loss.triplet_mining='hardest'"),
])
def test_triplet_mining_needs_in_batch_triplets_without_subsampling(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(["dataset=synthetic", *overrides])
    assert fragment in str(err.value)
    cfg = load_config(["dataset=synthetic", "data.sampling=balanced", "loss.triplet_mining=hard"])
    assert cfg.loss.triplet_mining == "hard"


def test_sampling_auto_is_decided_by_the_labels():
    """data.sampling=auto: class-balanced batches for class ids, shuffled batches for multi-hot labels; an explicit
    value is kept; the balanced batch shape is checked at load time, naming the keys."""
    from dsrh_lightning.config import resolve_sampling

    single = load_config(["dataset=synthetic", "data.sampling=auto"])
    assert resolve_sampling(single, multilabel=False) == "balanced" and single.data.sampling == "balanced"
    multi = load_config(["dataset=synthetic", "data.sampling=auto"])
    assert resolve_sampling(multi, multilabel=True) == "random" and multi.data.sampling == "random"
    explicit = load_config(["dataset=synthetic", "data.sampling=triplets"])
    assert resolve_sampling(explicit, multilabel=True) == "triplets"
    with pytest.raises(ConfigError, match=r"data.images_per_class=7 when data.sampling=auto"):
        load_config(["dataset=synthetic", "data.sampling=auto", "data.images_per_class=7"])
