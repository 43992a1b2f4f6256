"""Resolve the machine-dependent trainer settings (``precision=auto``, ``num_threads=0``) once, at start.

The resolved values are written back into the config, so ``config.yaml`` and the checkpoint's
hyperparameters record what a run actually used (a re-run from the saved config uses the same).

Why the thread count is recorded: CPU kernels (oneDNN convolutions, GEMM, torch's reductions) split
their sums into per-thread chunks, so 1 and 2 threads give results that differ in the last bits of
float32. Every random draw of training is seeded by position (``seeding.py``), so nothing else
depends on the thread count; but SGD on a hinge loss amplifies that float noise step after step (a
triplet that is barely active with one thread is barely inactive with two), and a long run can end
in a different local optimum, as two seeds do. The same seed with the same thread count on the same
machine gives the same run; different thread counts agree within float noise over a few steps
(``tests/test_first_hour.py``) and within seed-to-seed spread over long runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

__all__ = ["available_cpus", "physical_cores", "resolve_precision", "resolve_threads", "resolve_trainer"]


def _cgroup_cpu_limit() -> Optional[float]:
    """CPUs allowed by a cgroup v2 / v1 quota (containers, SLURM), or None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """Logical CPUs this process may run on (affinity mask, capped by a cgroup CPU quota)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, int(limit)))
    return max(1, n)


def physical_cores() -> int:
    """Physical cores among :func:`available_cpus` (hyper-threads of one core share its FPU)."""
    cpus = available_cpus()
    try:
        allowed = os.sched_getaffinity(0)
        cores = set()
        for cpu in allowed:
            base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add((base / "physical_package_id").read_text().strip() + ":" + (base / "core_id").read_text().strip())
        return max(1, min(cpus, len(cores)))
    except (AttributeError, OSError):
        return cpus


def resolve_threads(trainer_cfg: DictConfig) -> int:
    """``trainer.num_threads``, with 0 = the physical cores, divided among the CPU DDP ranks of this node."""
    n = int(trainer_cfg.num_threads)
    if n > 0:
        return n
    ranks = 1
    if trainer_cfg.accelerator == "cpu" and str(trainer_cfg.devices).isdigit():
        ranks = max(1, int(trainer_cfg.devices))
    return max(1, physical_cores() // ranks)


def _cuda_bf16() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    except Exception:  # a broken driver reads as "no GPU"
        return False


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """``trainer.precision``, with auto = bf16-mixed where training runs on a CUDA GPU with bf16, else 32-true."""
    value = str(trainer_cfg.precision)
    if value != "auto":
        return value
    on_gpu = trainer_cfg.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu and _cuda_bf16() else "32-true"


def resolve_trainer(cfg: DictConfig) -> None:
    """Resolve ``trainer.precision`` and ``trainer.num_threads`` in ``cfg`` and apply the thread count."""
    cfg.trainer.precision = resolve_precision(cfg.trainer)
    cfg.trainer.num_threads = resolve_threads(cfg.trainer)
    torch.set_num_threads(int(cfg.trainer.num_threads))
