"""Euclidean projection onto the probability simplex, without host-device syncs."""
from __future__ import annotations

import torch


def project_simplex(y: torch.Tensor, active: torch.Tensor | None = None,
                    fallback: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_x ||x - y||  s.t.  x >= 0, sum(x) = 1   (Duchi et al. 2008, Fig. 1), y: [M].

    With `active` ([M] bool), only the active entries move: inactive entries keep their value
    from `fallback` and the active ones are projected onto the simplex of the remaining mass
    {x >= 0, sum(x) = 1 - sum(fallback[~active])}. No `.item()`, no `nonzero()`: the index of
    the last positive entry is found with a masked argmax, so the whole step stays on device.
    """
    m = y.shape[0]
    if active is None:
        active = torch.ones(m, dtype=torch.bool, device=y.device)
        fallback = torch.zeros_like(y)
    assert fallback is not None
    mass = 1.0 - torch.where(active, torch.zeros_like(fallback), fallback).sum()
    # Sort active entries first (descending); inactive ones last, where they add nothing.
    key = torch.where(active, y, torch.full_like(y, float("-inf")))
    sorted_y, _ = torch.sort(key, descending=True)
    sorted_active = torch.isfinite(sorted_y)
    sorted_y = torch.where(sorted_active, sorted_y, torch.zeros_like(sorted_y))
    css = torch.cumsum(sorted_y, 0) - mass  # [M]
    ind = torch.arange(1, m + 1, device=y.device, dtype=y.dtype)
    cond = (sorted_y - css / ind > 0) & sorted_active
    # rho = last index where cond holds (cond is a prefix); at least 1.
    rho = torch.clamp((cond * ind).max(), min=1.0).to(torch.int64)
    theta = css.gather(0, (rho - 1).view(1)) / rho.to(y.dtype)  # [1]
    projected = torch.clamp(y - theta, min=0.0)
    return torch.where(active, projected, fallback)
