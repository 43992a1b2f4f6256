"""Image transforms: resize (224 for ImageNet-pretrained backbones, native otherwise),
crop/flip augmentation for training, normalisation."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "resolve_image_size", "build_transform", "evaluation_transform",
           "BatchTransform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_image_size(image_size: int, weights: str, native_size: int) -> int:
    """``image_size`` if set, else 224 for ImageNet weights, else the data's native size."""
    if image_size:
        return image_size
    return 224 if weights == "imagenet" else native_size


def _to_hwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0).contiguous().as_subclass(torch.Tensor)


def build_transform(size: int, native_size: Optional[int], train: bool, augment: bool,
                    mean: Sequence[float] = (), std: Sequence[float] = (), normalize: bool = True) -> T.Compose:
    """uint8 HWC numpy image -> normalised float CHW tensor of ``size`` x ``size``.

    ``normalize=False``: stop before the conversion to float and return the uint8 ``(size, size, 3)``
    image (image files on the device path: the worker decodes, crops and resizes, the device normalises).

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
    if not normalize:
        return T.Compose(steps + [_to_hwc])
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return T.Compose(steps)


def evaluation_transform(data_cfg, weights: str, native_size: Optional[int]) -> tuple[int, T.Compose]:
    """``(image size, evaluation transform)`` for a data config: the one place that decides both,
    shared by the data module and by encoding with a checkpoint (dsrh index / search).

    ``native_size`` is None for image files of varying size (then auto = 224).
    """
    size = resolve_image_size(data_cfg.image_size, weights, native_size or 224)
    return size, build_transform(size, native_size, False, False, data_cfg.mean, data_cfg.std)


class BatchTransform:
    """The device path: uint8 images ``(n, H, W, 3)`` -> normalised float ``(n, 3, size, size)`` in one batched
    operation on the images' device (data.augment_on=device).

    Random augmentation (``train`` and ``augment``) has the distribution of :func:`build_transform`:
    at the native size a random crop of the image padded by 1/8 (reflect), else a random-resized crop
    (scale 0.6-1, ratio 3/4-4/3); then a horizontal flip with probability 1/2. Its parameters are drawn per
    item on the CPU by :meth:`draw` from an explicit generator (seeded by ``seeding.item_seed``) and travel
    with the batch, so an item's augmentation depends on its seed only, not on the batch it is in, the
    device or the number of workers. Resizing is bilinear and rounded to integers like torchvision's uint8
    path, so the evaluation path matches :func:`build_transform` up to rounding.
    """

    NUM_PARAMS = 5  # top, left, height, width, flip

    def __init__(self, size: int, native_size: Optional[int], train: bool, augment: bool,
                 mean: Sequence[float] = (), std: Sequence[float] = ()) -> None:
        self.size = int(size)
        self.random = bool(train and augment)
        self.pad = max(1, native_size // 8) if self.random and size == native_size else 0
        self.mean = torch.tensor(tuple(mean) or IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(tuple(std) or IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)

    def draw(self, gen: torch.Generator, height: int, width: int) -> torch.Tensor:
        """``(top, left, h, w, flip)`` of one item, from ``gen`` only."""
        s = self.size
        if self.pad:
            top = int(torch.randint(0, height + 2 * self.pad - s + 1, (1,), generator=gen))
            left = int(torch.randint(0, width + 2 * self.pad - s + 1, (1,), generator=gen))
            h = w = s
        else:
            top, left, h, w = _resized_crop_box(gen, height, width, (0.6, 1.0), (3 / 4, 4 / 3))
        flip = float(torch.rand(1, generator=gen) < 0.5)
        return torch.tensor([top, left, h, w, flip], dtype=torch.float32)

    def __call__(self, pixels: torch.Tensor, params: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``pixels`` uint8 ``(n, H, W, 3)``; ``params`` ``(n, 5)`` from :meth:`draw` (None: no augmentation)."""
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (n, H, W, 3), got {tuple(pixels.shape)}")
        n, height, width, _ = pixels.shape
        s = self.size
        if params is not None and self.pad:
            p = self.pad
            x = F.pad(pixels.permute(0, 3, 1, 2).float(), (p, p, p, p), mode="reflect").permute(0, 2, 3, 1)
            ar = torch.arange(s, device=x.device)
            rows = params[:, 0].long()[:, None] + ar
            cols = params[:, 1].long()[:, None] + ar
            # One flat index_select (advanced indexing of a 4-d tensor is much slower on CPU).
            hp, wp = x.shape[1], x.shape[2]
            b = torch.arange(n, device=x.device)[:, None, None]
            flat = ((b * hp + rows[:, :, None]) * wp + cols[:, None, :]).reshape(-1)
            x = x.reshape(-1, 3).index_select(0, flat).reshape(n, s, s, 3).permute(0, 3, 1, 2)  # (n, 3, s, s)
        elif params is not None:
            from torchvision.ops import roi_align

            x = pixels.permute(0, 3, 1, 2).float()
            top, left, h, w = (params[:, k].to(x.dtype) for k in range(4))
            boxes = torch.stack([torch.arange(n, device=x.device, dtype=x.dtype), left, top, left + w, top + h], 1)
            x = roi_align(x, boxes, (s, s), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
            x = x.round().clamp_(0, 255)
        else:
            x = pixels.permute(0, 3, 1, 2).float()
            if (height, width) != (s, s):
                x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
                x = x.round().clamp_(0, 255)
        if params is not None:
            flip = params[:, 4].to(x.device) > 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x / 255.0 - mean) / std


def _resized_crop_box(gen: torch.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``gen`` instead of the global generator."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=gen)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def flip_half(maps: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Flip a random half (each item with probability 1/2) of a batch of feature maps left-right.

    Args:
        maps: ``(b, ..., H, W)`` float feature maps (``(b, 3, C, H, W)`` for explicit triplets: each of the
            ``b`` rows flips as one).
        generator: the random source (None: torch's global generator).

    Returns:
        A new tensor of the same shape: item ``i`` is ``maps[i].flip(-1)`` where its draw came up, else ``maps[i]``.
    """
    flip = torch.rand(maps.shape[0], generator=generator, device=maps.device if generator is None else "cpu")
    flip = (flip < 0.5).to(maps.device).view(-1, *([1] * (maps.dim() - 1)))
    return torch.where(flip, maps.flip(-1), maps)
