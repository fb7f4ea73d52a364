"""Low-rank factors by SVD, shared by `resize` and `extract`, and the retained-energy report.

A module's update ΔW ([out, in] for a Linear, [out, in, kh, kw] for a Conv2d, seen as [out, in·kh·kw]) with singular
values σ keeps, at rank k, the energy Σ_{i<k} σ_i² / Σ σ_i² (the share of ‖ΔW‖²_F that the best rank-k approximation
keeps). The factors are split evenly, up = U·√σ and down = √σ·Vᵀ, and written with alpha = k, so kohya's scale
alpha / rank is 1 and ΔW = up · down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class RetainedEnergy:
    """What one module keeps: its new rank, and its kept and total squared singular values."""

    module: str
    rank: int
    kept: float
    total: float

    @property
    def fraction(self) -> float:
        """The retained energy (1 for a module whose update is zero)."""
        return self.kept / self.total if self.total > 0 else 1.0


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, σ, Vᵀ) of `up @ down` ([m, r] @ [r, n]) from QR factorisations of the two factors: exact,
    at the cost of an r × r SVD instead of one of the m × n product."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, sigma, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u, sigma, vh @ q_down.T


def check_rank_and_energy(rank: int | None, energy: float | None) -> None:
    """A rank of at least 1 and an energy fraction in (0, 1], at least one of them given."""
    if rank is None and energy is None:
        raise InputError("Give --rank N, --energy E (0 < E <= 1), or both.")
    if rank is not None and rank < 1:
        raise InputError(f"--rank {rank}: a rank is at least 1.")
    if energy is not None and not 0 < energy <= 1:
        raise InputError(f"--energy {energy}: a fraction of the energy is in (0, 1].")


def chosen_rank(sigma: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The smallest rank that keeps at least `energy` of the energy, at most `rank` (and at least 1)."""
    chosen = len(sigma) if rank is None else min(rank, len(sigma))
    squares = sigma.double() ** 2
    if energy is not None and squares.sum() > 0:
        kept = torch.cumsum(squares, 0) / squares.sum()
        chosen = min(chosen, int((kept < energy - 1e-12).sum()) + 1)
    return max(chosen, 1)


def retained_energy(module: str, sigma: torch.Tensor, rank: int) -> RetainedEnergy:
    """What `module`, of singular values `sigma`, keeps at `rank`."""
    squares = sigma.double() ** 2
    return RetainedEnergy(module, rank, float(squares[:rank].sum()), float(squares.sum()))


def lora_factors(
    u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, rank: int, weight_shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of rank `rank` for a module whose weight has `weight_shape`: down [rank, in, *kernel] and up
    [out, rank, 1, ...], as PEFT's lora_A / lora_B (and kohya's lora_down / lora_up) hold them."""
    root = sigma[:rank].sqrt()
    down = (root[:, None] * vh[:rank]).reshape(rank, *weight_shape[1:])
    up = (u[:, :rank] * root).reshape(weight_shape[0], rank, *[1] * (len(weight_shape) - 2))
    return down, up


def print_energy_report(report: list[RetainedEnergy]) -> None:
    """One line per module (new rank, retained energy), then the overall retained energy."""
    width = max((len(entry.module) for entry in report), default=0)
    for entry in report:
        print(f"{entry.module:<{width}}  rank {entry.rank:>4}  energy {entry.fraction:.6f}")
    print(f"overall retained energy: {overall_energy(report):.6f} ({len(report)} modules)")


def overall_energy(report: list[RetainedEnergy]) -> float:
    """Kept over total squared singular values of all modules together."""
    total = sum(entry.total for entry in report)
    return sum(entry.kept for entry in report) / total if total > 0 else 1.0
