"""The LightningDataModule: source -> protocol split -> triplet / balanced training batches,
and (query, database) loader pairs for validation and test retrieval evaluation."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler

from .datasets import BatchedFetch, IndexedImageDataset, RawImages, TripletDataset, unbatched
from .features import (FeatureRows, data_fingerprint, feature_cache_path, feature_statistics,
                       load_or_extract_features)
from .image_list import usable_images
from .list_source import NUSWIDE21_CONCEPTS, ListPartition, load_list_source, load_nuswide_official
from .protocol import (Split, load_or_make_split, make_multilabel_split, make_single_label_split, save_split,
                       split_from_lists)
from ..config import resolve_sampling
from .distributed import EpochBatchSampler, ResumableDataLoader
from .sampling import ClassBalancedBatchSampler
from .mosaic import make_mosaics
from .sources import DataNotFoundError, Source, load_cifar10, make_synthetic, resolve_root
from .transforms import BatchTransform, build_transform, evaluation_transform, flip_half

__all__ = ["HashingDataModule", "load_source", "make_split"]

log = logging.getLogger(__name__)


def _nuswide_mode(d: DictConfig, root: Path) -> str:
    if d.nuswide_source != "auto":
        return d.nuswide_source
    lists = [d.train_list, d.query_list, d.database_list, d.list_file]
    if any(l and ((root / l).is_file() or Path(l).is_file()) for l in lists):
        return "lists"
    if (root / "ImageList" / "Imagelist.txt").is_file():
        return "official"
    raise DataNotFoundError(
        f"NUS-WIDE not found under '{root}': looked for the list files {[l for l in lists if l]} and for "
        f"NUS-WIDE's own {root}/ImageList/Imagelist.txt. Set data.root=PATH (DATA_DIR=PATH with make); "
        "data/README.md explains how to obtain NUS-WIDE.")


def load_source(data_cfg: DictConfig, seed: int, download: bool = False) -> tuple[Source, Optional[ListPartition]]:
    """Load the configured data set; list-based sets also return the lists' partition."""
    d = data_cfg
    if d.dataset == "synthetic":
        return make_synthetic(d.synthetic_classes, d.synthetic_per_class, d.synthetic_image_size, seed=seed), None
    if d.dataset == "cifar10":
        return load_cifar10(resolve_root(d.root, "cifar10"), download=download), None
    if d.dataset == "cifar10_multilabel":
        tiles = load_cifar10(resolve_root(d.root, "cifar10"), download=download)
        return make_mosaics(tiles.images, tiles.labels, tiles.class_names, d.mosaic_grid, seed=d.mosaic_seed), None
    if d.dataset == "custom":
        return load_list_source(d, "custom")
    if d.dataset == "nuswide":
        root = resolve_root(d.root, "nuswide")
        if _nuswide_mode(d, root) == "lists":
            return load_list_source(d, "nuswide", NUSWIDE21_CONCEPTS)
        paths, labels = load_nuswide_official(root)
        files, keep = usable_images(root, paths, d.check_images, d.on_bad, labels=labels)
        return Source(files, labels[keep], NUSWIDE21_CONCEPTS, "nuswide"), None
    raise ValueError(f"data.dataset={d.dataset!r} has no loader")


def make_split(source: Source, partition: Optional[ListPartition], data_cfg: DictConfig) -> Split:
    """The protocol split: from the lists when they define one, else seeded per-class/per-concept draws."""
    p = data_cfg.protocol
    if partition is not None and partition.all is None:
        missing = [k for k in ("train", "query", "database") if getattr(partition, k) is None]
        if missing:
            raise DataNotFoundError(f"data.dataset={source.name}: missing {', '.join('data.' + m + '_list' for m in missing)}; "
                                    "give all three lists, or one data.list_file to split by data.protocol")
        return split_from_lists(partition.query, partition.database, partition.train, source.labels,
                                source.class_names, p.val_per_class, p.val_database_size, p.seed)
    params = dict(query_per_class=p.query_per_class, train_per_class=p.train_per_class,
                  val_per_class=p.val_per_class, val_database_size=p.val_database_size, seed=p.seed)
    labels = source.labels
    make = make_multilabel_split if labels.ndim == 2 else make_single_label_split
    split_dir = Path(data_cfg.split_dir) if data_cfg.split_dir else None
    return load_or_make_split(lambda: make(labels, source.class_names, **params), source.name, labels, params,
                              split_dir)


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: a worker leaves job-wide signals to the main process.

    ``timeout``, a terminal's Ctrl-C and a shell's kill of a job signal the whole process group. A
    worker killed by SIGTERM makes torch raise "DataLoader worker ... killed" in the main process, so
    the run ended in a traceback before it could finish the step and write last.ckpt. Each worker
    therefore moves to a process group of its own: group signals reach only the main process, which
    handles them and shuts the workers down. Signals sent to the worker itself keep torch's handlers,
    so the main process can still terminate a worker that does not stop (ignoring SIGTERM instead
    made such an exit hang). A worker whose main process dies still exits (torch's parent watchdog).
    Lightning's worker seeding (``seed_everything(workers=True)``) is kept: Lightning only adds it to
    loaders without a ``worker_init_fn``.
    """
    try:
        os.setpgid(0, 0)
    except OSError:  # not permitted (e.g. already a session leader): keep the inherited group
        pass
    if os.environ.get("PL_SEED_WORKERS") == "1":
        from lightning_fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


class HashingDataModule(pl.LightningDataModule):
    """Data for supervised hashing.

    After :meth:`setup`: ``split`` (index sets), ``num_classes``, ``multilabel``,
    ``image_size``, and datasets ``train``, ``val``, ``val_database``, ``query``,
    ``database``. Validation and test each return two loaders, queries first. :meth:`setup` also
    resolves ``data.sampling=auto`` in ``cfg`` from the labels (:func:`~dsrh_lightning.config.resolve_sampling`),
    so a module built from ``cfg`` afterwards sees the sampling the loader uses.

    ``backbone_factory(backbone, weights, hash_input)`` builds the frozen backbone that extracts cached
    features (``data.cache_features=true``; e.g. ``models.build_backbone``): data does not import models.

    With ``data.augment_on=device`` (in-memory images), batches travel as uint8 and
    :meth:`on_after_batch_transfer` crops/flips/resizes/normalises them on the model's device.
    """

    def __init__(self, cfg: DictConfig, split_copy: Optional[Path] = None,
                 backbone_factory: Optional[Callable] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.split_copy = split_copy
        self.backbone_factory = backbone_factory
        self.train_batch_transform: Optional[BatchTransform] = None
        self.eval_batch_transform: Optional[BatchTransform] = None
        self.source: Optional[Source] = None
        self.split: Optional[Split] = None
        self._balanced_sampler: Optional[ClassBalancedBatchSampler] = None
        self._triplet_sampler: Optional[EpochBatchSampler] = None
        self._random_sampler: Optional[EpochBatchSampler] = None
        self._triplets: Optional[TripletDataset] = None

    # Lightning calls prepare_data on one process: the only place that downloads.
    def prepare_data(self) -> None:
        d = self.cfg.data
        if d.dataset in ("cifar10", "cifar10_multilabel") and d.download:
            load_cifar10(resolve_root(d.root, "cifar10"), download=True)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.source is not None:
            return
        d = self.cfg.data
        self.source, partition = load_source(d, self.cfg.seed, download=False)
        self.split = make_split(self.source, partition, d)
        if hasattr(self.source.images, "set_groups"):  # an undecodable image is replaced within its split sets
            self.source.images.set_groups(self.split.as_dict())
        if self.split_copy is not None:
            save_split(self.split, self.split_copy, {"dataset": self.source.name})
        log.info("split %s: %s", self.source.name, self.split.summary())
        native = self.source.native_size
        self.image_size, eval_tf = evaluation_transform(d, self.cfg.model.weights, native)
        train_tf = build_transform(self.image_size, native, True, d.augment, d.mean, d.std)
        img, lab = self.source.images, self.source.labels
        in_memory = isinstance(img, np.ndarray)
        eval_batch = BatchTransform(self.image_size, native, False, False, d.mean, d.std) if in_memory else None
        self.feature_dim: Optional[int] = None
        # data.feature_norm=standardize: (mean, std) of the training features, applied by the model's
        # first layer (so image files indexed later through the backbone are standardised alike).
        self.feature_stats: Optional[tuple] = None
        train_kw: dict = {}
        eval_kw: dict = {}
        if d.cache_features:
            img = self._cached_features(eval_tf, eval_batch)
            # Vectors: the network's backbone becomes the identity; lower-block outputs (partial
            # fine-tuning): the network runs its trainable top blocks on them.
            self.feature_dim = img.dim if img.features.ndim == 2 else None
            train_tf = eval_tf = None  # features are fixed: no augmentation, no per-item seeding
        elif in_memory and d.augment_on == "device":
            self.train_batch_transform = BatchTransform(self.image_size, native, True, d.augment, d.mean, d.std)
            self.eval_batch_transform = eval_batch
            train_kw = {"batch_transform": self.train_batch_transform}
            eval_kw = {"batch_transform": eval_batch}
            train_tf = eval_tf = None  # the whole transform runs on the device
        elif d.augment_on == "device":
            # Image files: decoded, cropped and resized (uint8) in the workers, normalised on the device.
            s = self.image_size
            self.train_batch_transform = self.eval_batch_transform = BatchTransform(s, s, False, False, d.mean, d.std)
            train_tf = build_transform(s, native, True, d.augment, d.mean, d.std, normalize=False)
            eval_tf = build_transform(s, native, False, False, d.mean, d.std, normalize=False)
            train_kw = {"batch_transform": self.train_batch_transform, "random": d.augment}
            eval_kw = {"batch_transform": self.eval_batch_transform, "random": False}
        else:
            train_kw = {"random": d.augment}
        # Seeded per-item augmentation where it is random; cached features have none.
        self.train = IndexedImageDataset(img, lab, self.split.train, train_tf, seed=self.cfg.seed, **train_kw)
        self.val = IndexedImageDataset(img, lab, self.split.val, eval_tf, **eval_kw)
        self.val_database = IndexedImageDataset(img, lab, self.split.val_database, eval_tf, **eval_kw)
        self.query = IndexedImageDataset(img, lab, self.split.query, eval_tf, **eval_kw)
        self.database = IndexedImageDataset(img, lab, self.split.database, eval_tf, **eval_kw)
        if d.sampling == "auto":  # the labels decide; the caller's config (and so config.yaml) records it
            log.info("data.sampling=auto: %s", resolve_sampling(self.cfg, self.multilabel))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Finish device-path batches on the model's device: uint8 -> augmented, normalised float images."""
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], RawImages):
            raw = batch[0]
            tf = self.train_batch_transform if raw.params is not None else self.eval_batch_transform
            pixels = raw.pixels.reshape(-1, *raw.pixels.shape[-3:])
            images = tf(pixels, None if raw.params is None else raw.params.to(pixels.device))
            batch = (images.reshape(*raw.lead, *images.shape[1:]), *batch[1:])
        elif self._flips_cached_maps():
            batch = (flip_half(batch[0]), *batch[1:])
        return batch

    def _trained_blocks_on_cache(self) -> int:
        """How many top blocks train on the cache: model.train_blocks=N > 0 caches the frozen part under them
        (partial fine-tuning); 0 when the cache holds whole-backbone features (or a frozen backbone)."""
        m = self.cfg.model
        return 0 if m.freeze_backbone else max(int(m.train_blocks), 0)

    def _flips_cached_maps(self) -> bool:
        """data.cache_flip on cached lower-block maps, in a training step of a Trainer."""
        d, trainer = self.cfg.data, self.trainer
        return bool(d.cache_flip and d.cache_features and self._trained_blocks_on_cache() > 0
                    and trainer is not None and trainer.training)

    def _cached_features(self, eval_tf, eval_batch: Optional[BatchTransform]) -> FeatureRows:
        """Backbone features of every image in the split, from the on-disk cache (extracted once)."""
        d, m = self.cfg.data, self.cfg.model
        if self.backbone_factory is None:
            raise ValueError("data.cache_features=true needs a backbone to extract features: construct "
                             "HashingDataModule(cfg, backbone_factory=models.build_backbone) (train/evaluate do)")
        fp = data_fingerprint(self.source.images, self.source.labels)
        norm = "imagenet" if not d.mean else hashlib.sha1(str((list(d.mean), list(d.std))).encode()).hexdigest()[:8]
        # A randomly initialised backbone depends on the seed; pretrained weights do not.
        seed = int(self.cfg.seed) if m.weights == "none" else None
        below = self._trained_blocks_on_cache()
        path = feature_cache_path(Path(d.feature_dir), self.source.name, m.backbone, m.weights, self.image_size,
                                  fp, norm, seed, m.hash_input, below)
        needed = np.concatenate([getattr(self.split, k) for k in ("query", "database", "train", "val",
                                                                   "val_database")])

        def make_backbone():
            if seed is not None:
                torch.manual_seed(seed)
            extra = {"below_last_blocks": below} if below else {}
            built = self.backbone_factory(m.backbone, m.weights, m.hash_input, **extra)
            return built[0] if isinstance(built, tuple) else built

        meta = {"dataset": self.source.name, "backbone": m.backbone, "weights": m.weights,
                "image_size": self.image_size, "fingerprint": fp, "norm": norm, "seed": seed,
                "hash_input": m.hash_input, "below_last_blocks": below}
        feats, idx = load_or_extract_features(path, needed, make_backbone, self.source.images, eval_tf, meta,
                                              batch_size=d.eval_batch_size, progress=self.cfg.trainer.progress_bar,
                                              batch_transform=eval_batch)
        self.feature_cache = path
        rows = FeatureRows(feats, idx, len(self.source.labels))
        if d.feature_norm == "standardize":  # the training images' statistics only: no test leakage
            self.feature_stats = feature_statistics(feats, rows.position[self.split.train])
        return rows

    @property
    def num_classes(self) -> int:
        assert self.source is not None, "call setup() first"
        return self.source.num_classes

    @property
    def multilabel(self) -> bool:
        assert self.source is not None, "call setup() first"
        return self.source.labels.ndim == 2

    def set_epoch(self, epoch: int) -> None:
        """Redraw explicit triplets / balanced batches for ``epoch`` (seeded)."""
        for obj in (self._triplets, self._triplet_sampler, self._random_sampler, self._balanced_sampler,
                    getattr(self, "train", None)):
            if obj is not None:
                obj.set_epoch(epoch)

    def _rank_world(self):
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _batches_done(self) -> int:
        """Training batches of the current epoch already consumed (saved in checkpoints for exact resume)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def _workers(self) -> int:
        # Cached features are one in-memory tensor gathered per batch: workers would only add IPC.
        return 0 if self.cfg.data.cache_features else self.cfg.data.num_workers

    def _loader(self, dataset, batch_size: int, **kw) -> DataLoader:
        # One fetch per batch (a tensor gather for cached features, raw uint8 on the device path).
        return DataLoader(BatchedFetch(dataset), batch_size=batch_size, num_workers=self._workers(),
                          persistent_workers=False, pin_memory=torch.cuda.is_available(), collate_fn=unbatched,
                          worker_init_fn=worker_init, **kw)

    def train_dataloader(self) -> DataLoader:
        """Seeded per epoch, a disjoint share per rank, resumable mid-epoch (see data/distributed.py)."""
        d = self.cfg.data
        rank, world = self._rank_world()
        if d.sampling == "triplets":
            if self._triplets is None:
                self._triplets = TripletDataset(self.train, d.triplets_per_image, seed=self.cfg.seed)
                self._triplet_sampler = EpochBatchSampler(len(self._triplets), d.batch_size, seed=self.cfg.seed,
                                                          rank=rank, world_size=world)
            dataset, batches = self._triplets, self._triplet_sampler
        elif d.sampling == "random":
            if self._random_sampler is None:
                self._random_sampler = EpochBatchSampler(len(self.train), d.batch_size, seed=self.cfg.seed,
                                                         rank=rank, world_size=world)
            dataset, batches = self.train, self._random_sampler
        else:
            if self._balanced_sampler is None:
                self._balanced_sampler = ClassBalancedBatchSampler(
                    self.train.subset_labels.numpy(), d.batch_size, d.images_per_class,
                    seed=self.cfg.seed, rank=rank, world_size=world)
            dataset, batches = self.train, self._balanced_sampler
        return ResumableDataLoader(BatchedFetch(dataset), batch_sampler=batches, num_workers=self._workers(),
                                   pin_memory=torch.cuda.is_available(), position=self._batches_done,
                                   collate_fn=unbatched, worker_init_fn=worker_init)

    def _eval_loader(self, dataset) -> DataLoader:
        # Under DDP each rank encodes a padded share; the evaluation callback gathers the shares and
        # drops the padding by item position (batch[2]).
        rank, world = self._rank_world()
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return self._loader(dataset, self.cfg.data.eval_batch_size, shuffle=False, sampler=sampler)

    def _pair(self, queries, database) -> List[DataLoader]:
        return [self._eval_loader(queries), self._eval_loader(database)]

    def val_dataloader(self) -> List[DataLoader]:
        return self._pair(self.val, self.val_database)

    def test_dataloader(self) -> List[DataLoader]:
        return self._pair(self.query, self.database)
