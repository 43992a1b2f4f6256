"""Image transforms: resize (224 for ImageNet-pretrained backbones, native otherwise),
crop/flip augmentation for training, normalisation."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchvision.transforms import v2 as T

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "resolve_image_size", "build_transform", "evaluation_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_image_size(image_size: int, weights: str, native_size: int) -> int:
    """``image_size`` if set, else 224 for ImageNet weights, else the data's native size."""
    if image_size:
        return image_size
    return 224 if weights == "imagenet" else native_size


def build_transform(size: int, native_size: Optional[int], train: bool, augment: bool,
                    mean: Sequence[float] = (), std: Sequence[float] = ()) -> T.Compose:
    """uint8 HWC numpy image -> normalised float CHW tensor of ``size`` x ``size``.

    Training augmentation: random crop (padding of 1/8 of the native size at the
    native resolution, or random-resized-crop when resizing) and horizontal flip.
    ``native_size`` is None for image files of varying size (always resized).
    """
    mean = tuple(mean) or IMAGENET_MEAN
    std = tuple(std) or IMAGENET_STD
    steps = [T.ToImage()]
    if train and augment:
        if size == native_size:
            steps.append(T.RandomCrop(size, padding=max(1, native_size // 8), padding_mode="reflect"))
        else:
            steps.append(T.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True))
        steps.append(T.RandomHorizontalFlip())
    elif size != native_size:
        steps.append(T.Resize((size, size), antialias=True))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return T.Compose(steps)


def evaluation_transform(data_cfg, weights: str, native_size: Optional[int]) -> tuple[int, T.Compose]:
    """``(image size, evaluation transform)`` for a data config: the one place that decides both,
    shared by the data module and by encoding with a checkpoint (dsrh index / search).

    ``native_size`` is None for image files of varying size (then auto = 224).
    """
    size = resolve_image_size(data_cfg.image_size, weights, native_size or 224)
    return size, build_transform(size, native_size, False, False, data_cfg.mean, data_cfg.std)
