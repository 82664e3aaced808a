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
    mass = 1.0 - torch.where(active, 0.0, fallback).sum()
    # Active entries first (descending); inactive ones last, as zeros that add nothing.
    sorted_y = torch.sort(torch.where(active, y, float("-inf")), descending=True).values
    sorted_active = torch.isfinite(sorted_y)
    sorted_y = torch.nan_to_num(sorted_y, neginf=0.0)
    css = torch.cumsum(sorted_y, 0) - mass  # [M]
    ind = torch.arange(1, m + 1, device=y.device, dtype=y.dtype)
    cond = (sorted_y * ind > css) & sorted_active  # u_k - css_k / k > 0, a prefix
    rho = (cond * ind).amax().clamp(min=1.0)  # index of its last entry (at least 1)
    theta = css.gather(0, (rho - 1).long().view(1)) / rho  # [1]
    return torch.where(active, (y - theta).clamp(min=0.0), fallback)
