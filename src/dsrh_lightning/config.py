"""The one typed configuration schema, and how YAML files and overrides are merged onto it.

Configuration flows as: schema defaults (the paper's constants) <- dataset YAML
<- experiment YAML <- extra YAML files <- command-line overrides. Every layer is
merged onto the structured schema, so a misspelled key or a value of the wrong
type fails at start with the key named.

Overrides are accepted as ``key=value`` and as ``--key=value`` (the form W&B
agents pass). Two override keys are special and pick YAML files instead of
setting values: ``dataset=NAME`` (``experiments/configs/dataset/NAME.yaml``) and
``experiment=NAME`` (``experiments/configs/experiment/NAME.yaml``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import DsrhError

__all__ = [
    "Config",
    "ConfigError",
    "default_config_dir",
    "load_config",
    "normalise_overrides",
    "save_config",
]

DATASETS = ("cifar10", "synthetic", "nuswide", "custom", "cifar10_multilabel")
BACKBONES = ("vgg19", "vgg19_bn", "vgg16", "resnet18", "resnet50", "small_cnn", "efficientnet_lite0")


class ConfigError(DsrhError, ValueError):
    """A configuration problem; the message names the key and what is expected."""


@dataclass
class ProtocolConfig:
    """How images are split into query / train / validation / database sets."""

    query_per_class: int = 100
    train_per_class: int = 500
    # Validation queries, drawn from the database but never from the training images.
    val_per_class: int = 50
    # Size of the (seeded, random) database subset that validation queries rank; 0 = whole database.
    val_database_size: int = 5000
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    # Where the data lives; "" = $DSRH_DATA_DIR, else ./data/<dataset>.
    root: str = ""
    download: bool = True
    # Where generated split files are cached ("" = <root>/splits is not used; see data/protocol.py).
    split_dir: str = "data/splits"
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    # List files (nuswide, custom): "relative/path.jpg <class id>" or "relative/path.jpg 0 1 ... 1" per line,
    # paths relative to data.root. Three lists give the split; list_file alone is split by data.protocol.
    train_list: str = ""
    query_list: str = ""
    database_list: str = ""
    list_file: str = ""
    # Expected multi-hot width (0 = from the first line).
    num_labels: int = 0
    # A bad line or image: "error" (stop, naming file and line) or "skip" (drop it, log a count).
    on_bad: str = "error"
    # Check listed images at setup: none | exists | header (PIL can identify the file) | decode.
    check_images: str = "header"
    # Accept images whose multi-hot labels are all 0.
    allow_unlabelled: bool = False
    # nuswide: "lists" (train/query/database lists), "official" (ImageList + Groundtruth/AllLabels files,
    # split by data.protocol) or "auto" (lists when the list files exist).
    nuswide_source: str = "auto"
    # "triplets": explicit (query, positive, negative) triplets sampled from labels (the paper);
    # "balanced": class-balanced batches, all valid triplets mined inside the batch;
    # "random": shuffled batches, triplets mined inside the batch (multi-label data, weighted ranking);
    # "auto": "balanced" for single-label data, "random" for multi-label data (decided by the labels when
    # the data module is set up; the run's config.yaml records the choice).
    sampling: str = "triplets"
    triplets_per_image: int = 1
    # Triplets per batch in "triplets" mode; images per batch in "balanced" mode.
    batch_size: int = 64
    # "balanced" mode: images per class in a batch.
    images_per_class: int = 8
    # Cap on mined triplets per batch in "balanced" mode (0 = all).
    max_triplets: int = 0
    eval_batch_size: int = 256
    num_workers: int = 2
    # 0 = automatic: 224 for ImageNet-pretrained backbones, the native image size otherwise.
    image_size: int = 0
    augment: bool = True
    # Where in-memory images (cifar10, synthetic) are cropped/flipped/resized/normalised: "device" (a batch
    # travels as uint8 and is transformed on the model's device in one operation, per-item seeded by explicit
    # generators) or "worker" (torchvision per image in the DataLoader workers, the former path).
    # Image files always decode and transform in the workers.
    augment_on: str = "device"
    # Normalisation statistics; empty = ImageNet's.
    mean: List[float] = field(default_factory=list)
    std: List[float] = field(default_factory=list)
    # Train the heads on backbone features computed once (eval mode, no augmentation) and cached in
    # data.feature_dir, keyed by backbone, weights, image size and data fingerprint; the backbone is frozen.
    # With model.train_blocks=N > 0 the cache holds the output of the frozen lower blocks instead and the
    # top N blocks train on it. Augmentation cannot apply to cached inputs: data.augment is not used.
    # Extraction is written in chunks: a stopped extraction (Ctrl-C) continues where it stopped.
    cache_features: bool = False
    # With cache_features and model.train_blocks=N > 0 (cached lower-block feature maps): flip a random half
    # of each training batch's feature maps left-right, a stand-in for the image flip that cached inputs
    # cannot get (exact for the frozen part only where its kernels are mirror-symmetric, approximate otherwise).
    cache_flip: bool = False
    feature_dir: str = "data/features"
    # With cache_features: "standardize" z-scores every feature dimension by the mean and std of the
    # training images' features (statistics from the training split only); "none" keeps them as extracted.
    feature_norm: str = "none"
    # dataset=cifar10_multilabel: mosaics of mosaic_grid x mosaic_grid CIFAR-10 tiles (labels = the classes
    # that appear), built from data.root's CIFAR-10 with mosaic_seed (data/mosaic.py).
    mosaic_grid: int = 2
    mosaic_seed: int = 0
    # Synthetic data set (dataset=synthetic).
    synthetic_classes: int = 10
    synthetic_per_class: int = 200
    synthetic_image_size: int = 32


@dataclass
class ModelConfig:
    backbone: str = "vgg19"
    # "imagenet" (torchvision weights API, downloaded once; fails clearly when unavailable), "none" (random
    # init) or "auto" (imagenet when obtainable, else none with a warning; the saved config records the result).
    weights: str = "imagenet"
    bits: int = 48
    # Units per bag in the hash stream: the last FC has bag_size * bits units.
    bag_size: int = 30
    # Activation between the s*k FC layer and the per-bag encoders: relu | sigmoid | none.
    bag_activation: str = "relu"
    # Input of the hash stream: "last" (fc7 for VGG) or "last_two" (fc6 and fc7 concatenated, Zhao et al.).
    hash_input: str = "last"
    # A trainable shared layer (FC shared_dim + ReLU) between the backbone and both streams; 0 = none. With a
    # frozen backbone or cached features it is the only place the classification stream can shape what
    # the hash stream reads (without it DSRH's classification term cannot change the codes there).
    shared_dim: int = 0
    # Classification stream on the shared features (its loss weight is loss.cls_weight).
    classifier: bool = True
    dropout: float = 0.5
    # Freeze the backbone (train only the heads); the same as train_blocks=0.
    freeze_backbone: bool = False
    # Partial fine-tuning: the last N blocks of the backbone train, the stem and the blocks below are frozen
    # (no gradients, kept in eval mode: BatchNorm statistics and dropout fixed). 0 = all frozen, -1 = all
    # train. Blocks: small_cnn's 4 conv blocks + FC; VGG's 5 conv stages + classifier; ResNet's layer1-4;
    # EfficientNet-Lite0's 7 stages + head. With data.cache_features=true and N > 0, the frozen part's output
    # is cached once and the top N blocks train on it (no augmentation); with -1 the whole backbone is cached.
    train_blocks: int = -1


@dataclass
class LossConfig:
    # "triplet": the DSRH hinge on squared code distances (Yao et al.);
    # "weighted": Zhao et al.'s multilevel ranking hinge on a Hamming surrogate, weighted by (2^ri - 2^rj)/Z.
    # Peer methods in place of the ranking term (losses/peers.py): "dpsh" (pairwise likelihood),
    # "dtsh" (triplet likelihood), "hashnet" (weighted pairwise, tanh continuation), "csq" (hash centres).
    # The allowed names are those of losses/registry.py.
    ranking: str = "triplet"
    # Weight of the ranking method's term in the objective (whatever the method: triplet hinge, DPSH, CSQ, ...).
    ranking_weight: float = 1.0
    # The method's own settings, as keyword arguments of its class (checked against its signature when the
    # run builds its loss, losses/from_config.py); the keys below feed the built-in methods directly.
    params: Dict[str, Any] = field(default_factory=dict)
    margin: float = 1.0
    # "constant": margin as given; "per_bit": margin * bits (codes live in [0,1]^bits).
    margin_scaling: str = "constant"
    # DSRH's triplet hinge averaged over "all" triplets (the paper's mean) or over the "active" ones (hinge > 0,
    # Hermans et al. 2017's batch-all), which keeps the step from shrinking as more triplets are satisfied.
    triplet_average: str = "all"
    # Which in-batch triplets (data.sampling=balanced or random) the hinge sees: "all" valid ones (the paper),
    # "semihard" (negative farther than the positive, within the margin) or "hard" (each anchor's farthest positive and nearest
    # negative, Hermans et al. 2017's batch-hard).
    triplet_mining: str = "all"
    # lambda of the orthogonality penalty (0 disables it).
    orth_weight: float = 0.25
    # Normalisation of ||(1/m) H~^T H~ - I||_F^2: "none" (paper), "bits" (/k) or "bits2" (/k^2).
    orth_norm: str = "none"
    cls_weight: float = 1.0
    # Bit balance penalty ||mean over the batch of (2h - 1)||^2 (Zhao et al.); 0 disables it.
    balance_weight: float = 0.0
    # Peer losses: quantisation weight (DPSH eta, DTSH lambda, CSQ lambda), DTSH margin alpha,
    # HashNet sigmoid scale (0 = 10/bits) and tanh-scale continuation beta = (1 + gamma*step)^power.
    quant_weight: float = 0.1
    dtsh_margin: float = 5.0
    hashnet_alpha: float = 0.0
    hashnet_gamma: float = 0.005
    hashnet_power: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 2e-4
    # Multiply the learning rate by lr_decay every lr_decay_steps optimiser steps.
    lr_decay_steps: int = 5000
    lr_decay: float = 0.1
    # Learning-rate multiplier for pretrained backbone parameters.
    backbone_lr_mult: float = 1.0


@dataclass
class TrainerConfig:
    max_steps: int = 10000
    max_epochs: int = -1
    # Validation (retrieval MAP on the validation split) every N training steps (0 = every epoch).
    val_check_interval: int = 1000
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    # auto (bf16-mixed on a GPU that supports bf16, else 32-true; the saved config records the result),
    # 32 / 32-true, bf16-mixed (CPU or Ampere+ GPUs) or 16-mixed (GPUs); losses and metrics run in fp32.
    precision: str = "auto"
    # torch's intra-op CPU threads of the training process (0 = auto: the physical cores this process may
    # use, shared among CPU DDP ranks; DataLoader workers use 1 each). The saved config records the result.
    num_threads: int = 0
    # Save <run>/checkpoints/last.ckpt every N optimiser steps (0 = only at validation and at the end).
    checkpoint_every_n_steps: int = 1000
    # ... and at least every N minutes of training (0 = off); SIGINT / SIGTERM also write last.ckpt.
    checkpoint_every_minutes: float = 10.0
    gradient_clip_val: float = 0.0
    log_every_n_steps: int = 50
    limit_val_batches: float = 1.0
    # Run the test-query evaluation (query set vs full database) after fitting.
    test_after_fit: bool = True
    deterministic: bool = False
    progress_bar: bool = True


@dataclass
class EvalConfig:
    # Binarisation threshold on the sigmoid outputs: b = 1 iff h > threshold.
    threshold: float = 0.5
    # radius, topk, precision_at, ndcg_k, acg_k, wmap_topk: the options of the metric specs
    # (metrics/specs.py), passed to retrieval_metrics by name; a new metric's option gets a key here.
    radius: int = 2
    # MAP over the top K of the ranking (0 = whole database).
    topk: int = 0
    precision_at: List[int] = field(default_factory=lambda: [100, 1000])
    # Multilevel metrics (0 = off): NDCG@k, ACG@k, weighted mAP@K.
    ndcg_k: int = 0
    acg_k: int = 0
    wmap_topk: int = 0
    # Queries with no relevant database item: "zero" (AP = 0) or "skip".
    empty_queries: str = "zero"
    ties: str = "stable"


@dataclass
class LoggerConfig:
    # wandb | csv | none
    name: str = "wandb"
    project: str = "dsrh-lightning"
    entity: str = ""
    # "" = online when an API key is configured, offline otherwise.
    mode: str = ""
    tags: List[str] = field(default_factory=list)


@dataclass
class Config:
    seed: int = 0
    # Free-text name of the run; "" = <dataset>-<experiment>-<bits>b-<timestamp>.
    name: str = ""
    experiment: str = "dsrh"
    output_dir: str = "runs"
    # Continue a run: a checkpoint path, or "auto" = <output_dir>/<name>/checkpoints/last.ckpt when it exists.
    resume: str = ""
    # A fresh run never reuses a folder that holds a run; true deletes that run first (see README, Promises).
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


_CHOICES = {
    "data.dataset": DATASETS,
    "data.sampling": ("triplets", "balanced", "random", "auto"),
    "data.augment_on": ("device", "worker"),
    "data.feature_norm": ("none", "standardize"),
    "data.on_bad": ("error", "skip"),
    "data.check_images": ("none", "exists", "header", "decode"),
    "data.nuswide_source": ("auto", "lists", "official"),
    "model.hash_input": ("last", "last_two"),
    "model.backbone": BACKBONES,
    "model.weights": ("imagenet", "none", "auto"),
    "model.bag_activation": ("relu", "sigmoid", "none"),
    "loss.margin_scaling": ("constant", "per_bit"),
    "loss.orth_norm": ("none", "bits", "bits2"),
    "loss.triplet_average": ("all", "active"),
    "loss.triplet_mining": ("all", "semihard", "hard"),
    "eval.empty_queries": ("zero", "skip"),
    "eval.ties": ("stable", "average"),
    "logger.name": ("wandb", "csv", "none"),
    "logger.mode": ("", "online", "offline", "disabled"),
    "trainer.precision": ("auto", "32", "32-true", "bf16-mixed", "16-mixed"),
}

_POSITIVE = (
    "model.bits",
    "model.bag_size",
    "data.batch_size",
    "data.eval_batch_size",
    "data.triplets_per_image",
    "data.images_per_class",
    "data.protocol.query_per_class",
    "data.protocol.train_per_class",
    "data.mosaic_grid",
    "optim.lr_decay_steps",
)

_NON_NEGATIVE = (
    "model.shared_dim",
    "data.num_workers",
    "data.protocol.val_per_class",
    "data.protocol.val_database_size",
    "data.max_triplets",
    "data.image_size",
    "loss.margin",
    "loss.orth_weight",
    "loss.cls_weight",
    "loss.ranking_weight",
    "optim.lr",
    "optim.weight_decay",
    "eval.radius",
    "eval.topk",
    "eval.ndcg_k",
    "eval.acg_k",
    "eval.wmap_topk",
    "loss.balance_weight",
    "loss.quant_weight",
    "loss.hashnet_alpha",
    "loss.hashnet_gamma",
    "data.num_labels",
    "trainer.checkpoint_every_n_steps",
    "trainer.checkpoint_every_minutes",
    "seed",
    "data.protocol.seed",
    "data.mosaic_seed",
    "optim.backbone_lr_mult",
    "trainer.val_check_interval",
    "trainer.gradient_clip_val",
    "trainer.num_threads",
)

# Seeds feed numpy / torch / Lightning's seed_everything, which take unsigned 32-bit values.
_MAX_SEED = 2**32 - 1


def default_config_dir() -> Path:
    """``experiments/configs`` of the source checkout, or ``$DSRH_CONFIG_DIR``."""
    env = os.environ.get("DSRH_CONFIG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "experiments" / "configs"


def normalise_overrides(args: Sequence[str]) -> List[str]:
    """Turn ``--a.b=1`` / ``a.b=1`` / ``--a.b 1`` forms into ``a.b=1`` strings."""
    out: List[str] = []
    items = list(args)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            item = item[2:]
            if "=" not in item:
                if i + 1 >= len(items):
                    raise ConfigError(f"override '--{item}' has no value; write --{item}=VALUE")
                item = f"{item}={items[i + 1]}"
                i += 1
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key = item.split("=", 1)[0]
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        out.append(item)
        i += 1
    return out


def _yaml_for(group: str, name: str, config_dir: Path) -> Path:
    path = config_dir / group / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        raise ConfigError(
            f"{group}={name}: no file {path}; available {group}s: {', '.join(available) or '(none)'}"
        )
    return path


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        hint = f" ({key} was renamed {RENAMED_KEYS[key]})" if key in RENAMED_KEYS else ""
        raise ConfigError(f"{source}: bad config key '{key}': {_first_line(exc)}{hint}") from None


# Keys renamed since configs were first saved: old dotted key -> new one (upgrade_legacy_config).
RENAMED_KEYS = {"loss.triplet_weight": "loss.ranking_weight"}


def upgrade_legacy_config(d: dict) -> dict:
    """A saved config (a plain nested dict, e.g. a checkpoint's ``hyper_parameters.config``) with the keys an
    older version wrote renamed to today's (:data:`RENAMED_KEYS`); a new dict, ``d`` is not changed.
    A key present under both names keeps the new name's value."""
    if OmegaConf.is_config(d):
        d = OmegaConf.to_container(d, resolve=True)
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in dict(d).items()}
    for old, new in RENAMED_KEYS.items():
        (osec, oname), (nsec, nname) = old.split("."), new.split(".")
        section = out.get(osec)
        if isinstance(section, dict) and oname in section:
            value = section.pop(oname)
            out.setdefault(nsec, {})
            if nname not in out[nsec]:
                out[nsec][nname] = value
    return out


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


#: At most this many nodes may be added by aliases (``*name``) expanding anchors (``&name``); a
#: "billion laughs" file nests aliases to expand a few lines into billions of nodes.
MAX_ALIAS_NODES = 100_000


def _check_aliases(path: Path) -> None:
    """Raise :class:`ConfigError` when aliases in ``path`` expand to more than ``MAX_ALIAS_NODES`` extra
    nodes. Counts on the composed node graph (aliases share their anchor's node, nothing is expanded);
    documents without aliases pass whatever their size."""
    import yaml

    with open(path, "rb") as f:
        root = yaml.compose(f, Loader=yaml.SafeLoader)
    if root is None:
        return
    sizes: dict = {}  # id(node) -> expanded size of the subtree
    unique: set = set()
    stack = [(root, False)]
    while stack:  # iterative post-order walk: deep documents do not hit the recursion limit
        node, done = stack.pop()
        key = id(node)
        if done:
            children = _yaml_children(node)
            sizes[key] = 1 + sum(sizes.get(id(c), 0) for c in children)
            continue
        if key in unique:
            continue  # an alias: its anchor's size is (or will be) counted where it is used
        unique.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _yaml_children(node) if id(c) not in unique)
    extra = sizes[id(root)] - len(unique)
    if extra > MAX_ALIAS_NODES:
        raise ConfigError(f"{path}: YAML aliases (*name) expand {len(unique)} nodes by {extra} more, over the limit "
                          f"of {MAX_ALIAS_NODES}; write the values out instead of nesting aliases")


def _yaml_children(node: Any) -> list:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _load_yaml(path: Path) -> DictConfig:
    """One YAML config file as a mapping; syntax errors keep their ``file:line:column``."""
    import yaml

    try:
        _check_aliases(path)
        # The alias check above replaces OmegaConf's limit, which counts every node (a plain list of
        # 20,000 entries was refused as an "expansion").
        loaded = OmegaConf.load(path, max_yaml_expanded_nodes=None)
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as exc:  # syntax errors carry the position of the problem
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        raise ConfigError(f"{where}: cannot parse YAML: {what}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except Exception as exc:
        raise ConfigError(f"{path}: cannot parse YAML: {_first_line(exc)}") from None
    if loaded is None or (isinstance(loaded, DictConfig) and len(loaded) == 0):
        return OmegaConf.create({})
    if not isinstance(loaded, DictConfig):
        kind = "a list" if OmegaConf.is_list(loaded) else type(loaded).__name__
        raise ConfigError(f"{path}: the top level is {kind}; a config file must be a mapping of sections "
                          "(e.g. 'model:' followed by indented 'bits: 48')")
    return loaded


def load_config(
    overrides: Sequence[str] = (),
    config_files: Sequence[str | Path] = (),
    config_dir: Optional[Path] = None,
) -> DictConfig:
    """Build the validated run configuration.

    Args:
        overrides: ``key=value`` or ``--key=value`` strings; ``dataset=NAME`` and
            ``experiment=NAME`` select YAML files.
        config_files: extra YAML files merged after the dataset and experiment files.
        config_dir: where ``dataset/`` and ``experiment/`` YAMLs live.

    Returns:
        A structured (typed) OmegaConf config; raises :class:`ConfigError` naming
        the offending key or file.
    """
    config_dir = Path(config_dir) if config_dir else default_config_dir()
    items = normalise_overrides(overrides)
    dataset, experiment, rest = None, None, []
    for item in items:
        key, value = item.split("=", 1)
        if key in ("dataset", "data.dataset"):
            dataset = value
        elif key == "experiment":
            experiment = value
        else:
            # "key=" means the empty string (OmegaConf would read None).
            rest.append(item if value else f"{key}=''")
    cfg = OmegaConf.structured(Config)
    files: List[Path] = []
    if dataset:
        if dataset not in DATASETS:
            raise ConfigError(f"dataset={dataset}: expected one of {', '.join(DATASETS)}")
        files.append(_yaml_for("dataset", dataset, config_dir))
    if experiment:
        files.append(_yaml_for("experiment", experiment, config_dir))
    files.extend(Path(f) for f in config_files)
    for path in files:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = _load_yaml(Path(path))
        cfg = _merge(cfg, loaded, str(path))
    if dataset:
        cfg.data.dataset = dataset
    if experiment:
        cfg.experiment = experiment
    try:
        dotlist = OmegaConf.from_dotlist(rest)
    except Exception as exc:
        raise ConfigError(f"cannot parse overrides {rest}: {_first_line(exc)}") from None
    cfg = _merge(cfg, dotlist, "command line")
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check value ranges and choices that the types alone cannot express."""
    _check_finite(cfg, "")
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(repr(c) for c in choices)}")
    # Ranking methods come from their registry (a name -> "module:Class" table; reading it imports no torch).
    from .losses.registry import ranking_names
    if cfg.loss.ranking not in ranking_names():
        raise ConfigError(f"loss.ranking={cfg.loss.ranking!r}: expected one of "
                          f"{', '.join(repr(c) for c in ranking_names())}")
    for key in _POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be > 0")
    for key in _NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be >= 0")
    for key in ("seed", "data.protocol.seed"):
        if OmegaConf.select(cfg, key) > _MAX_SEED:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)}: must be <= {_MAX_SEED} (an unsigned 32-bit seed)")
    if not 0.0 <= cfg.optim.momentum < 1.0:
        raise ConfigError(f"optim.momentum={cfg.optim.momentum}: must be in [0, 1)")
    if cfg.optim.lr_decay <= 0:
        raise ConfigError(f"optim.lr_decay={cfg.optim.lr_decay}: must be > 0 (1 = no decay)")
    t = cfg.trainer
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"trainer.max_steps={t.max_steps}: must be > 0, or -1 to train for trainer.max_epochs")
    if t.max_epochs == 0 or t.max_epochs < -1:
        raise ConfigError(f"trainer.max_epochs={t.max_epochs}: must be > 0, or -1 (no epoch limit)")
    if t.max_steps == -1 and t.max_epochs == -1:
        raise ConfigError("trainer.max_steps=-1 and trainer.max_epochs=-1: set one of them (> 0) so training ends")
    if t.num_nodes <= 0:
        raise ConfigError(f"trainer.num_nodes={t.num_nodes}: must be > 0")
    if t.limit_val_batches <= 0:
        raise ConfigError(f"trainer.limit_val_batches={t.limit_val_batches}: must be > 0")
    _check_devices(t.devices)
    _check_run_name(cfg.name)
    if cfg.trainer.precision == "16-mixed" and cfg.trainer.accelerator == "cpu":
        raise ConfigError("trainer.precision='16-mixed' needs a GPU; use trainer.precision=bf16-mixed on CPU")
    if not 0.0 < cfg.eval.threshold < 1.0:
        raise ConfigError(f"eval.threshold={cfg.eval.threshold}: must be in (0, 1) (codes are sigmoid outputs)")
    if cfg.data.sampling in ("balanced", "auto") and cfg.data.batch_size % cfg.data.images_per_class:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be a multiple of "
            f"data.images_per_class={cfg.data.images_per_class} when data.sampling={cfg.data.sampling} "
            "(class-balanced batches for single-label data)"
        )
    if cfg.data.sampling in ("balanced", "auto") and cfg.data.batch_size // cfg.data.images_per_class < 2:
        raise ConfigError(f"data.sampling={cfg.data.sampling} needs at least 2 classes per batch "
                          "(batch_size / images_per_class) for single-label data")
    if cfg.loss.ranking == "weighted" and cfg.data.sampling == "triplets":
        raise ConfigError("loss.ranking=weighted mines multilevel triplets inside each batch: set "
                          "data.sampling=random (or balanced for single-label data)")
    if cfg.loss.triplet_mining != "all" and cfg.loss.ranking == "triplet":
        if cfg.data.sampling == "triplets":
            raise ConfigError(f"loss.triplet_mining={cfg.loss.triplet_mining} mines triplets inside each batch: set "
                              "data.sampling=balanced (or random), or loss.triplet_mining=all for explicit triplets")
        if cfg.data.max_triplets:
            raise ConfigError(f"loss.triplet_mining={cfg.loss.triplet_mining} does not subsample triplets: set "
                              "data.max_triplets=0 (or loss.triplet_mining=all)")
    if cfg.model.hash_input == "last_two" and not cfg.model.backbone.startswith("vgg"):
        raise ConfigError(f"model.hash_input=last_two needs a VGG backbone (fc6 + fc7), not {cfg.model.backbone}")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.model.dropout}: must be in [0, 1)")
    for k in cfg.eval.precision_at:
        if k <= 0:
            raise ConfigError(f"eval.precision_at contains {k}: every k must be > 0")
    m = cfg.model
    if m.train_blocks < -1:
        raise ConfigError(f"model.train_blocks={m.train_blocks}: must be >= 0 (the last N blocks train), or -1 (all)")
    if m.freeze_backbone and m.train_blocks not in (-1, 0):
        raise ConfigError(f"model.freeze_backbone=true freezes every block, but model.train_blocks={m.train_blocks}: "
                          "set one of them (freeze_backbone=true is train_blocks=0)")
    if cfg.data.feature_norm != "none" and cfg.data.cache_features and not m.freeze_backbone and m.train_blocks > 0:
        raise ConfigError(f"data.feature_norm={cfg.data.feature_norm} normalises cached feature vectors; with "
                          f"model.train_blocks={m.train_blocks} the cache holds lower-block outputs: set "
                          "data.feature_norm=none")
    if cfg.data.feature_norm != "none" and not cfg.data.cache_features:
        raise ConfigError(f"data.feature_norm={cfg.data.feature_norm} normalises cached backbone features: "
                          "set data.cache_features=true, or data.feature_norm=none")
    if len(cfg.data.mean) != len(cfg.data.std):
        raise ConfigError("data.mean and data.std must have the same length (or both be empty)")


def _check_finite(node: Any, prefix: str) -> None:
    """Reject NaN and infinite floats anywhere in the config, naming the key."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            _check_finite(node[key], f"{prefix}.{key}" if prefix else str(key))
    elif OmegaConf.is_list(node):
        for i, value in enumerate(node):
            _check_finite(value, f"{prefix}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{prefix}={node}: must be a finite number")


def _check_run_name(name: str) -> None:
    """A run name names one folder inside ``output_dir``: no path separators, not ``.`` or ``..``."""
    if not name:
        return
    if "/" in name or "\\" in name or name in (".", "..") or "\0" in name or len(name) > 200:
        raise ConfigError(f"name={name!r}: a run name is a folder name inside output_dir (letters, digits, "
                          "'-', '_', '.'; no '/' or '\\', not '.' or '..', at most 200 characters); "
                          "to write runs elsewhere set output_dir=PATH")


# "auto", a count ("2"), -1 (all), or a list of device ids ("0,1", or "1," for device 1 alone).
_DEVICES = re.compile(r"^(auto|-1|\d+|\d+(\s*,\s*\d+)*\s*,?)$")


def _check_devices(value: Any) -> None:
    text = str(value).strip()
    if not _DEVICES.match(text) or (text.isdigit() and int(text) == 0):
        raise ConfigError(f"trainer.devices={value!r}: expected 'auto', a count such as 2, -1 (all devices) "
                          "or device ids such as '0,1'")


def parse_devices(value: str):
    """``trainer.devices`` for Lightning: an int for "2" and "-1", the string otherwise ("auto", "0,1").

    Raises :class:`ConfigError` naming ``trainer.devices`` for anything Lightning cannot take.
    """
    _check_devices(value)
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def resolve_sampling(cfg: DictConfig, multilabel: bool) -> str:
    """``data.sampling=auto`` becomes ``balanced`` (class-balanced batches, every valid triplet mined inside
    them) for single-label data and ``random`` (shuffled batches, triplets of images that share a label
    against images that share none) for multi-label data; any other value is kept. Sets the key in ``cfg``
    and returns it."""
    if cfg.data.sampling == "auto":
        cfg.data.sampling = "random" if multilabel else "balanced"
    return str(cfg.data.sampling)


def save_config(cfg: DictConfig, path: Path, header: str = "") -> None:
    """Write the resolved configuration as YAML (atomically), after ``header`` (``#`` comment lines)."""
    from .files import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, header + OmegaConf.to_yaml(cfg, resolve=True))


def to_dict(cfg: DictConfig) -> dict:
    """Plain nested dict (for loggers' hyperparameters)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
