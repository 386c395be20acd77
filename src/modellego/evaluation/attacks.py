"""Adversarial examples in plain torch, to measure detectors on them: FGSM and PGD (L∞)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError
from ..hooks import eval_mode


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lo: float, hi: float) -> torch.Tensor:
    """Fast gradient sign attack (Goodfellow et al., 2015): one step of size `eps`, clipped to [lo, hi]."""
    return pgd(model, x, y, eps, lo, hi, steps=1, step=eps, random_start=False)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lo: float | torch.Tensor,
        hi: float | torch.Tensor, *, steps: int = 10, step: float | None = None, random_start: bool = True,
        seed: int = 0) -> torch.Tensor:
    """Projected gradient descent in the L∞ ball of radius `eps` around `x` (Madry et al., 2018).

    Args:
        model: the attacked classifier (left in its training mode; run in eval mode here).
        x: inputs as the model sees them, Shape (B, C, H, W); `eps`, `lo` and `hi` in the same units.
        y: true labels, Shape (B,).
        lo, hi: the valid input range (per channel tensors of Shape (1, C, 1, 1) allowed).
        steps: gradient steps; `step` their size (default 2.5·eps/steps).
        random_start: start from a uniform point of the ball.
    """
    if eps <= 0 or steps < 1:
        raise UserError(f"an attack needs eps > 0 and steps >= 1, got eps={eps}, steps={steps}")
    step = step if step is not None else 2.5 * eps / steps
    x0 = x.detach()
    adv = x0.clone()
    if random_start:
        g = torch.Generator(device="cpu").manual_seed(seed)
        adv = adv + (torch.rand(adv.shape, generator=g, dtype=adv.dtype) * 2 - 1).to(adv.device) * eps
    with eval_mode(model), torch.enable_grad():  # callers may be under no_grad
        for _ in range(steps):
            adv = torch.max(torch.min(adv, torch.as_tensor(hi, dtype=adv.dtype, device=adv.device)),
                            torch.as_tensor(lo, dtype=adv.dtype, device=adv.device)).requires_grad_(True)
            loss = nn.functional.cross_entropy(model(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + step * grad.sign()
            adv = torch.min(torch.max(adv, x0 - eps), x0 + eps)
    lo_t = torch.as_tensor(lo, dtype=adv.dtype, device=adv.device)
    hi_t = torch.as_tensor(hi, dtype=adv.dtype, device=adv.device)
    return torch.max(torch.min(adv, hi_t), lo_t).detach()
