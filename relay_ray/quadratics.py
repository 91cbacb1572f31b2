"""Heterogeneous least squares: f_i(x) = 1/2 ||A_i x - b_i||^2, with a heterogeneity knob (pure numpy).

zeta^2 = mean_i ||grad f_i(x*)||^2 is set exactly: the local gradients at the optimum are drawn,
centred (so x* is optimal for F = mean_i f_i) and scaled.  Every local Hessian A_i^T A_i has
eigenvalues in [0.1, 1] (local smoothness L = 1, condition number 10), so one constant learning
rate (0.1) is stable for every algorithm, and F* is known in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIMENSION = 10
MIN_EIGENVALUE = 0.1


@dataclass
class QuadraticsTask:
    a: np.ndarray  # (n, d, d)
    b: np.ndarray  # (n, d)
    x_star: np.ndarray  # (d,)
    f_star: float
    heterogeneity: float

    @property
    def num_workers(self) -> int:
        return self.a.shape[0]

    @property
    def dimension(self) -> int:
        return self.a.shape[2]

    def local_loss_and_grad(self, rank: int, x: np.ndarray) -> tuple[float, np.ndarray]:
        residual = self.a[rank] @ x.astype(np.float64) - self.b[rank]
        return 0.5 * float(residual @ residual), self.a[rank].T @ residual

    def objective(self, x: np.ndarray) -> float:
        """F(x) = mean_i f_i(x), in float64."""
        residual = np.einsum("nij,j->ni", self.a, x.astype(np.float64)) - self.b
        return 0.5 * float(np.mean(np.sum(residual**2, axis=1)))

    def suboptimality(self, x: np.ndarray) -> float:
        return max(self.objective(x) - self.f_star, 0.0)


def make_quadratics(num_workers: int, heterogeneity: float, seed: int, dimension: int = DIMENSION) -> QuadraticsTask:
    rng = np.random.default_rng(seed)
    a = np.empty((num_workers, dimension, dimension))
    for i in range(num_workers):
        eigenvalues = np.concatenate([[1.0, MIN_EIGENVALUE], rng.uniform(MIN_EIGENVALUE, 1.0, dimension - 2)])
        rotation, _ = np.linalg.qr(rng.normal(size=(dimension, dimension)))
        a[i] = np.diag(np.sqrt(eigenvalues)) @ rotation.T  # A_i^T A_i = Q diag(eig) Q^T
    x_star = rng.normal(size=dimension)
    grads = rng.normal(size=(num_workers, dimension))
    grads -= grads.mean(axis=0)  # sum_i grad f_i(x*) = 0, so x* minimises F
    scale = np.sqrt(heterogeneity / np.mean(np.sum(grads**2, axis=1))) if heterogeneity > 0 else 0.0
    grads *= scale
    # grad f_i(x*) = A_i^T (A_i x* - b_i) = g_i  <=>  b_i = A_i x* - A_i^{-T} g_i
    offsets = np.stack([np.linalg.solve(a[i].T, grads[i]) for i in range(num_workers)])
    b = np.einsum("nij,j->ni", a, x_star) - offsets
    f_star = 0.5 * float(np.mean(np.sum(offsets**2, axis=1)))
    return QuadraticsTask(a=a, b=b, x_star=x_star, f_star=f_star, heterogeneity=heterogeneity)
