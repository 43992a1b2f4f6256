"""Fast checks of the scale-out pieces: rank shares, resumable batches, DDP padding removal, precision, resume."""

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from dsrh_lightning.lightning.callbacks.checkpoint import assert_finite_parameters
from dsrh_lightning.lightning.callbacks.retrieval import dedupe_by_position
from dsrh_lightning.config import ConfigError, load_config
from dsrh_lightning.data.datasets import IndexedImageDataset
from dsrh_lightning.data.distributed import EpochBatchSampler, ResumableDataLoader
from dsrh_lightning.data.sampling import ClassBalancedBatchSampler
from dsrh_lightning.losses import orthogonality_penalty, triplet_ranking_loss
from dsrh_lightning.runs.folders import resolve_run


def test_epoch_batches_disjoint_over_ranks_and_reseeded_per_epoch():
    shares = [EpochBatchSampler(103, 4, seed=3, rank=r, world_size=3) for r in range(3)]
    flat = [i for s in shares for b in s for i in b]
    assert len(flat) == len(set(flat)) == 3 * len(shares[0]) * 4  # disjoint, full batches only
    assert all(0 <= i < 103 for i in flat)
    again = EpochBatchSampler(103, 4, seed=3, rank=1, world_size=3)
    assert list(again) == list(shares[1])  # a pure function of (seed, epoch, rank)
    again.set_epoch(1)
    assert list(again) != list(shares[1])


def test_resumable_loader_continues_mid_epoch():
    data = torch.arange(40)
    sampler = EpochBatchSampler(40, 5, seed=0)
    sampler.set_epoch(2)
    full = [b.tolist() for b in ResumableDataLoader(data, batch_sampler=sampler)]
    fresh = ResumableDataLoader(data, batch_sampler=EpochBatchSampler(40, 5, seed=0), position=lambda: 3)
    fresh.load_state_dict({"epoch": 2, "batches_done": 3})
    assert [b.tolist() for b in fresh] == full[3:]
    assert [b.tolist() for b in fresh] == full  # the skip applies to one iteration only
    assert fresh.state_dict() == {"epoch": 2, "batches_done": 3}


def test_class_balanced_sampler_resume_at():
    labels = np.repeat(np.arange(6), 10)
    s = ClassBalancedBatchSampler(labels, 12, 3, seed=1)
    full = list(s)
    s.resume_at(2)
    assert list(s) == full[2:]


def test_dedupe_removes_distributed_padding_and_restores_order():
    n, world = 7, 2
    codes = torch.randint(0, 2, (n, 5), dtype=torch.uint8)
    labels = torch.arange(n) % 3
    pos, cat_codes, cat_labels = [], [], []
    for rank in range(world):  # what each rank encodes; DistributedSampler repeats item 0 to pad rank 1
        idx = torch.tensor(list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)))
        pos.append(idx), cat_codes.append(codes[idx]), cat_labels.append(labels[idx])
    gathered = torch.cat(pos)
    assert len(gathered) == 8  # padding happened
    p, c, lab = dedupe_by_position(gathered, torch.cat(cat_codes), torch.cat(cat_labels))
    assert p.tolist() == list(range(n))
    assert torch.equal(c, codes) and torch.equal(lab, labels)


def test_training_augmentation_is_seeded_per_item(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)

    def noisy(img):
        return torch.as_tensor(img, dtype=torch.float32) + torch.rand(1)

    ds = IndexedImageDataset(images, np.arange(4), np.arange(4), noisy, seed=5)
    torch.manual_seed(1)
    a = ds[2][0]
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = ds[2][0]
    assert torch.equal(a, b)  # independent of the global random state...
    assert torch.equal(torch.get_rng_state(), state)  # ...which it leaves untouched
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], a)  # but redrawn each epoch


def test_precision_is_validated():
    assert load_config(["trainer.precision=bf16-mixed"]).trainer.precision == "bf16-mixed"
    assert load_config(["trainer.precision=32"]).trainer.precision == "32"
    with pytest.raises(ConfigError, match="trainer.precision"):
        load_config(["trainer.precision=fp16"])
    with pytest.raises(ConfigError, match="bf16-mixed on CPU"):
        load_config(["trainer.precision=16-mixed", "trainer.accelerator=cpu"])
    with pytest.raises(ConfigError, match="checkpoint_every_n_steps"):
        load_config(["trainer.checkpoint_every_n_steps=-1"])


def test_losses_are_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    q, p, n = (torch.rand(64, 48, generator=g) for _ in range(3))
    ref_t, ref_o = triplet_ranking_loss(q, p, n, 1.0), orthogonality_penalty([q, p, n])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = triplet_ranking_loss(q.bfloat16(), p.bfloat16(), n.bfloat16(), 1.0)
        o = orthogonality_penalty([q.bfloat16(), p.bfloat16(), n.bfloat16()])
    assert t.dtype == torch.float32 and o.dtype == torch.float32
    # Only the bf16 rounding of the inputs remains (bf16 arithmetic would be ~1e-2 off).
    assert torch.allclose(o, ref_o, rtol=2e-2) and torch.allclose(t, ref_t, rtol=2e-2, atol=1e-2)


def test_non_finite_parameters_block_checkpoints():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert_finite_parameters(net)
    with torch.no_grad():
        net[1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="1.bias"):
        assert_finite_parameters(net)


def test_resolve_run(tmp_path):
    base = ["dataset=synthetic", f"output_dir={tmp_path}"]
    run_dir, ckpt = resolve_run(load_config(base + ["name=a", "resume=auto"]))
    assert run_dir == tmp_path / "a" and ckpt is None  # nothing to resume: fresh
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    good = {"state_dict": {}, "global_step": 1, "hyper_parameters": {"config": {}}}  # resume=auto checks it loads
    torch.save(good, last)
    assert resolve_run(load_config(base + ["name=a", "resume=auto"])) == (tmp_path / "a", last)
    # Without a name: the newest last.ckpt of runs with the same dataset/experiment/bits/seed.
    cfg = load_config(base + ["resume=auto"])
    prefix = f"synthetic-dsrh-{cfg.model.bits}b-s0"
    for i, stamp in enumerate(["20240101-000000", "20240102-000000"]):
        p = tmp_path / f"{prefix}-{stamp}" / "checkpoints" / "last.ckpt"
        p.parent.mkdir(parents=True)
        torch.save(good, p)
        import os
        os.utime(p, (1000 + i, 1000 + i))
    assert resolve_run(cfg) == (tmp_path / f"{prefix}-20240102-000000",
                                tmp_path / f"{prefix}-20240102-000000" / "checkpoints" / "last.ckpt")
    assert resolve_run(load_config(base + [f"resume={last}"])) == (tmp_path / "a", last)
    with pytest.raises(FileNotFoundError, match="resume="):
        resolve_run(load_config(base + [f"resume={tmp_path / 'nope.ckpt'}"]))
