"""Classical baselines: properties each implementation could get wrong."""

import numpy as np
import pytest

from dsrh_lightning.baselines import BASELINES, ITQ, LSH, PCAH, SpectralHashing, build_baseline
from dsrh_lightning.metrics import retrieval_metrics


def _clusters(n_per=100, d=16, k=4, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(k, d))
    labels = np.repeat(np.arange(k), n_per)
    return centers[labels] + rng.normal(0, spread, size=(k * n_per, d)), labels


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("bits", [4, 12])
def test_codes_have_requested_bits_and_are_binary(name, bits):
    x, _ = _clusters(d=20)
    codes = build_baseline(name, bits, seed=1).fit(x).encode(x[:7])
    assert codes.shape == (7, bits) and codes.dtype == np.uint8
    assert set(np.unique(codes)) <= {0, 1}


def test_encode_before_fit_and_wrong_dim_fail():
    with pytest.raises(RuntimeError, match="fit"):
        PCAH(4).encode(np.zeros((2, 8)))
    model = ITQ(4).fit(np.random.default_rng(0).normal(size=(50, 8)))
    with pytest.raises(ValueError, match="8"):
        model.encode(np.zeros((2, 9)))
    with pytest.raises(ValueError, match="principal"):
        PCAH(10).fit(np.zeros((20, 4)))


def test_lsh_is_seeded_and_the_seed_matters():
    x, _ = _clusters()
    a, b, c = (LSH(16, seed=s).fit(x).encode(x) for s in (3, 3, 4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_pcah_bits_are_balanced_around_the_mean_and_directions_orthonormal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 10)) @ rng.normal(size=(10, 10)) + 5.0  # correlated, offset
    model = PCAH(6).fit(x)
    proj = model.project(x)
    np.testing.assert_allclose(proj.mean(0), 0, atol=1e-9)  # projections are centred on the training mean
    np.testing.assert_allclose(model.P.T @ model.P, np.eye(6), atol=1e-9)
    assert np.all(np.diff(model.variances) <= 1e-12)  # sorted by variance
    np.testing.assert_allclose(proj.var(0, ddof=1), model.variances, rtol=1e-6)


def test_itq_rotation_is_orthogonal_and_quantisation_loss_never_increases():
    x, _ = _clusters(d=32, k=6)
    model = ITQ(8, seed=2, iterations=30).fit(x)
    np.testing.assert_allclose(model.R.T @ model.R, np.eye(8), atol=1e-9)
    losses = np.array(model.losses)
    assert np.all(np.diff(losses) <= 1e-7 * losses[0]), losses
    assert losses[-1] < losses[0]  # the rotation helps compared with a random one
    # The loss is evaluated on the model's own projections.
    v = (x - model.mean) @ model.P @ model.R
    assert np.isclose(np.sum((np.where(v >= 0, 1, -1) - v) ** 2), losses[-1])


def test_spectral_hashing_separates_two_clusters_with_its_first_bit():
    rng = np.random.default_rng(0)
    # Two clusters along the first axis; the first (lowest-frequency) eigenfunction splits them.
    x = np.concatenate([rng.normal([-5, 0, 0], 0.5, size=(200, 3)), rng.normal([5, 0, 0], 0.5, size=(200, 3))])
    labels = np.repeat([0, 1], 200)
    sh = SpectralHashing(3).fit(x)
    first = sh.encode(x)[:, 0]
    assert {first[labels == 0].mean(), first[labels == 1].mean()} == {0.0, 1.0}
    # Lowest-frequency modes first; every mode uses one dimension.
    assert np.all((sh.modes != 0).sum(1) == 1)
    eig = ((sh.modes / (sh.mx - sh.mn)) ** 2).sum(1)
    assert np.all(np.diff(eig) >= -1e-12)


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_retrieve_clustered_data_far_above_chance(name):
    x, labels = _clusters(n_per=60, d=24, k=4, spread=0.5)
    codes = build_baseline(name, 16, seed=0).fit(x).encode(x)
    m = retrieval_metrics(codes, codes, labels, labels)
    assert m["map"] > 0.5, (name, m["map"])  # chance is ~0.25


def test_unknown_baseline_is_named():
    with pytest.raises(ValueError, match="ksh"):
        build_baseline("ksh", 8)
