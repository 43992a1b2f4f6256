"""LSH, PCAH, ITQ and Spectral Hashing as small numpy classes with ``fit(x)`` / ``encode(x)``.

All take features ``x`` of shape ``(n, d)`` (float) and return codes ``(n, bits)``
uint8 in {0, 1}. Each zero-centres with the training mean.

* LSH (Charikar 2002; random hyperplanes): ``b = [W^T (x - mu) > 0]``, ``W ~ N(0, I)``.
* PCAH: ``b = [P^T (x - mu) > 0]`` with ``P`` the top-``bits`` principal directions.
* ITQ (Gong & Lazebnik, CVPR 2011): PCA to ``bits`` dims, then an orthogonal rotation
  ``R`` minimising the quantisation loss ``||B - V R||_F^2`` by alternating
  ``B = sign(V R)`` and the orthogonal Procrustes solution for ``R``.
* Spectral Hashing (Weiss, Torralba & Fergus, NIPS 2008): PCA, then the ``bits``
  analytical eigenfunctions of smallest eigenvalue on the box spanned by the PCA
  projections, ``b = [sin(pi/2 + omega * (v - v_min)) > 0]`` (the released MATLAB code).
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np

__all__ = ["LSH", "PCAH", "ITQ", "SpectralHashing", "build_baseline", "pca"]


def _check(x: np.ndarray, name: str = "x") -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (n, d) feature matrix, got shape {x.shape}")
    return x


def pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean ``(d,)``, top-``k`` principal directions ``(d, k)`` (descending variance) and their variances ``(k,)``."""
    x = _check(x)
    if k > x.shape[1]:
        raise ValueError(f"cannot take {k} principal directions of {x.shape[1]}-d features")
    mu = x.mean(0)
    cov = np.cov(x - mu, rowvar=False)
    vals, vecs = np.linalg.eigh(np.atleast_2d(cov))
    order = np.argsort(vals)[::-1][:k]
    return mu, vecs[:, order], vals[order]


def _to_bits(v: np.ndarray) -> np.ndarray:
    return (v > 0).astype(np.uint8)


class _Base:
    def __init__(self, bits: int, seed: int = 0) -> None:
        if bits <= 0:
            raise ValueError(f"bits must be > 0, got {bits}")
        self.bits, self.seed = int(bits), int(seed)
        self.mean: Optional[np.ndarray] = None

    def _centred(self, x: np.ndarray) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError(f"{type(self).__name__}: call fit() before encode()")
        x = _check(x)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features have {x.shape[1]} dims, the model was fit on {self.mean.shape[0]}")
        return x - self.mean

    def project(self, x: np.ndarray) -> np.ndarray:
        """Real-valued projections ``(n, bits)`` whose signs are the codes."""
        raise NotImplementedError

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Codes ``(n, bits)`` uint8 in {0, 1}: ``[project(x) > 0]``."""
        return _to_bits(self.project(x))

    def fit_encode(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).encode(x)


class LSH(_Base):
    """Random-hyperplane LSH on mean-centred features."""

    def fit(self, x: np.ndarray) -> "LSH":
        x = _check(x)
        self.mean = x.mean(0)
        self.W = np.random.default_rng(self.seed).standard_normal((x.shape[1], self.bits))
        return self

    def project(self, x: np.ndarray) -> np.ndarray:
        return self._centred(x) @ self.W


class PCAH(_Base):
    """Sign of the top-``bits`` PCA projections."""

    def fit(self, x: np.ndarray) -> "PCAH":
        self.mean, self.P, self.variances = pca(x, self.bits)
        return self

    def project(self, x: np.ndarray) -> np.ndarray:
        return self._centred(x) @ self.P


class ITQ(_Base):
    """Iterative quantisation: PCA + learned orthogonal rotation (``iterations`` alternations)."""

    def __init__(self, bits: int, seed: int = 0, iterations: int = 50) -> None:
        super().__init__(bits, seed)
        self.iterations = int(iterations)
        self.losses: List[float] = []

    def fit(self, x: np.ndarray) -> "ITQ":
        self.mean, self.P, _ = pca(x, self.bits)
        v = (_check(x) - self.mean) @ self.P  # (n, k)
        rng = np.random.default_rng(self.seed)
        r, _ = np.linalg.qr(rng.standard_normal((self.bits, self.bits)))  # random orthogonal init
        self.losses = []
        for _ in range(self.iterations):
            b = np.where(v @ r >= 0, 1.0, -1.0)  # fix R, update B
            self.losses.append(float(np.sum((b - v @ r) ** 2)))
            # fix B, update R: orthogonal Procrustes, argmin_R ||B - V R||_F  =>  R = U W^T with U S W^T = svd(V^T B)
            u, _, wt = np.linalg.svd(v.T @ b)
            r = u @ wt
        b = np.where(v @ r >= 0, 1.0, -1.0)
        self.losses.append(float(np.sum((b - v @ r) ** 2)))
        self.R = r
        return self

    def project(self, x: np.ndarray) -> np.ndarray:
        return self._centred(x) @ self.P @ self.R


class SpectralHashing(_Base):
    """Spectral Hashing with the separable sinusoidal eigenfunctions of a uniform box (Weiss et al.)."""

    def fit(self, x: np.ndarray) -> "SpectralHashing":
        x = _check(x)
        k = self.bits
        self.mean, self.P, _ = pca(x, min(k, x.shape[1]))
        v = (x - self.mean) @ self.P
        self.mn, self.mx = v.min(0) - 1e-12, v.max(0) + 1e-12
        r = self.mx - self.mn
        # Candidate modes: along each PCA direction j, frequencies 1..max_mode[j] proportional to its range.
        max_mode = np.ceil((k + 1) * r / r.max()).astype(int)
        n_dims = len(r)
        modes = [np.zeros(n_dims)]
        for j in range(n_dims):
            for m in range(1, max_mode[j] + 1):
                row = np.zeros(n_dims)
                row[j] = m
                modes.append(row)
        modes = np.array(modes)
        # Eigenvalue of mode m grows with sum_j (m_j / r_j)^2; skip the constant mode, keep the k smallest.
        eig = ((modes / r) ** 2).sum(1)
        order = np.argsort(eig, kind="stable")[1:k + 1]
        if len(order) < k:
            raise ValueError(f"spectral hashing found only {len(order)} modes for {k} bits")
        self.modes = modes[order]  # (k, n_dims)
        return self

    def project(self, x: np.ndarray) -> np.ndarray:
        v = self._centred(x) @ self.P - self.mn  # (n, n_dims)
        omega = self.modes * np.pi / (self.mx - self.mn)  # (k, n_dims)
        # Each chosen mode is non-zero in exactly one dimension: product over dims of the 1-D eigenfunctions.
        out = np.ones((v.shape[0], self.bits))
        for b in range(self.bits):
            for j in np.flatnonzero(self.modes[b]):
                out[:, b] *= np.sin(np.pi / 2 + v[:, j] * omega[b, j])
        return out


def build_baseline(name: str, bits: int, seed: int = 0):
    """``lsh | pcah | itq | sh`` -> an unfitted model."""
    classes = {"lsh": LSH, "pcah": PCAH, "itq": ITQ, "sh": SpectralHashing}
    if name not in classes:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(classes)}")
    return classes[name](bits, seed)
