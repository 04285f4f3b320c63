"""Metrics on the accuracy matrix R, where R[i][j] is the accuracy on task j's test set after training task i
(T x T, tasks in training order).

  average accuracy  A = mean_j R[T-1][j]
  backward transfer BWT = 1/(T-1) * sum_{j<T-1} (R[T-1][j] - R[j][j])            (Lopez-Paz & Ranzato 2017)
  forgetting        F = 1/(T-1) * sum_{j<T-1} (max_{j<=l<=T-2} R[l][j] - R[T-1][j])  (Chaudhry et al. 2018)
                    The max runs only over rows *after* task j was learned (l >= j): taking it over all earlier
                    rows, as some libraries did, lets an accuracy measured before the task was learned count.
  forward transfer  FWT = 1/(T-1) * sum_{j>=1} (R[j-1][j] - b[j]), b[j] = accuracy of the initial (untrained)
                    model on task j. Undefined (None) in class-incremental learning, where a task's classes
                    cannot be predicted before they are seen (their outputs are masked).
"""
from __future__ import annotations

from typing import Sequence

from netdiet.errors import NetdietError

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix) -> int:
    T = len(R)
    if T == 0 or any(len(row) != T for row in R):
        raise NetdietError("the accuracy matrix must be square (T x T) with T >= 1")
    return T


def average_accuracy(R: Matrix) -> float:
    T = _check(R)
    return sum(R[T - 1]) / T


def backward_transfer(R: Matrix) -> float | None:
    T = _check(R)
    if T < 2:
        return None
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forgetting_per_task(R: Matrix) -> list[float]:
    T = _check(R)
    return [max(R[l][j] for l in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)]


def forgetting(R: Matrix) -> float | None:
    per = forgetting_per_task(R)
    return sum(per) / len(per) if per else None


def forward_transfer(R: Matrix, baseline: Sequence[float] | None) -> float | None:
    T = _check(R)
    if T < 2 or baseline is None:
        return None
    if len(baseline) != T:
        raise NetdietError(f"forward transfer needs one baseline accuracy per task ({T}), got {len(baseline)}")
    return sum(R[j - 1][j] - baseline[j] for j in range(1, T)) / (T - 1)


def summarise(R: Matrix, baseline: Sequence[float] | None) -> dict:
    return {"average_accuracy": average_accuracy(R), "bwt": backward_transfer(R), "forgetting": forgetting(R),
            "forgetting_per_task": forgetting_per_task(R), "fwt": forward_transfer(R, baseline)}
