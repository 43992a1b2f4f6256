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


def test_bad_yaml_file_names_file_and_key(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("model:\n  bitss: 12\n")
    with pytest.raises(ConfigError) as err:
        load_config([], config_files=[f])
    assert str(f) in str(err.value) and "bitss" in str(err.value)


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
