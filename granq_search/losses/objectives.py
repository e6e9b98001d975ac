"""Generator and student objectives (GRANQ.md section 3, steps 3 and 4), as pure functions.

All coefficients come in explicitly (from :class:`~granq_search.config.LossConfig`); every
function follows the dtype and device of its logits and works at any batch size. Softmax
quantities are computed through ``log_softmax`` for numerical stability.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from granq_search.config import LossConfig

__all__ = [
    "MARGIN_EPS",
    "softmax_entropy",
    "normalized_entropy",
    "margin_loss",
    "disagreement_agreement_loss",
    "generator_loss",
    "entropy_student_loss",
    "kl_student_loss",
    "student_loss",
]

MARGIN_EPS = 1e-8
"""Default lower bound on the denominator ``log C - min H`` of the normalised entropy."""


def _check_logits(z_t: Tensor, z_s: Tensor) -> None:
    if z_t.shape != z_s.shape or z_t.dim() != 2:
        raise ValueError(f"teacher and student logits must both be (N, C); got {tuple(z_t.shape)} "
                         f"and {tuple(z_s.shape)}")


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of ``softmax(logits)`` over the last dim (natural log), shape (N,)."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def normalized_entropy(logits: Tensor, *, eps: float = MARGIN_EPS) -> Tensor:
    """``H' = (H - min H) / (log C - min H)`` with ``H`` the per-sample softmax entropy.

    The minimum is over the batch and stays in the autograd graph (as in the recipe). The
    denominator is clamped to at least ``eps``; it is zero only when every sample's softmax is
    uniform (or C == 1), and then the numerator is zero too, so ``H' = 0``.
    With one sample ``H == min H`` and therefore ``H' = 0`` (no gradient).
    """
    h = softmax_entropy(logits)
    h_min = h.min()
    denom = (math.log(logits.shape[-1]) - h_min).clamp_min(eps)
    return (h - h_min) / denom


def margin_loss(z_t: Tensor, z_s: Tensor, lambda_l: float, lambda_u: float, *,
                eps: float = MARGIN_EPS) -> Tensor:
    """``mean(relu(lambda_l - H')) + mean(relu(H' - lambda_u))`` on ``H'`` of ``z_t - z_s``.

    Keeps the normalised teacher/student disagreement entropy inside ``[lambda_l, lambda_u]``.
    With a batch of one ``H' = 0`` and the loss is the constant ``relu(lambda_l)``.
    ``eps`` guards the normaliser (see :func:`normalized_entropy`).
    """
    _check_logits(z_t, z_s)
    h_norm = normalized_entropy(z_t - z_s, eps=eps)
    return F.relu(lambda_l - h_norm).mean() + F.relu(h_norm - lambda_u).mean()


def disagreement_agreement_loss(z_t: Tensor, z_s: Tensor, y: Tensor, alpha_ds: float,
                                alpha_as: float) -> Tensor:
    """``alpha_ds * CE(z_t - z_s, y) + alpha_as * CE(z_t + z_s, y)`` (CE averaged over the batch)."""
    _check_logits(z_t, z_s)
    return alpha_ds * F.cross_entropy(z_t - z_s, y) + alpha_as * F.cross_entropy(z_t + z_s, y)


def generator_loss(z_t: Tensor, z_s: Tensor, y: Tensor, bn_loss: Tensor | float,
                   cfg: LossConfig) -> tuple[Tensor, dict[str, float]]:
    """``L_G = L_margin + beta * (ds/as cross-entropies) + gamma * L_BNS`` and its parts.

    Nothing is detached: gradients reach the generator through both logits and ``bn_loss``
    (from :func:`~granq_search.losses.bns_loss`). A term whose weight (beta or gamma) is zero is
    left out of the sum entirely (so a non-finite part cannot leak in as ``0 * inf``).
    The dict holds floats: ``g_total`` (the returned loss), ``g_margin``, ``g_ce`` (the
    alpha-weighted cross-entropy block before ``beta``) and ``g_bns`` (before ``gamma``).
    """
    l_margin = margin_loss(z_t, z_s, cfg.lambda_l, cfg.lambda_u)
    l_ce = disagreement_agreement_loss(z_t, z_s, y, cfg.alpha_ds, cfg.alpha_as)
    if not isinstance(bn_loss, Tensor):
        bn_loss = torch.as_tensor(bn_loss, dtype=l_margin.dtype, device=l_margin.device)
    total = l_margin
    if cfg.beta != 0:
        total = total + cfg.beta * l_ce
    if cfg.gamma != 0:
        total = total + cfg.gamma * bn_loss
    parts = {
        "g_total": float(total.detach()),
        "g_margin": float(l_margin.detach()),
        "g_ce": float(l_ce.detach()),
        "g_bns": float(bn_loss.detach()),
    }
    return total, parts


def entropy_student_loss(z_t: Tensor, z_s: Tensor, temperature: float) -> Tensor:
    """The public recipe: ``-T^2 * mean(entropy(softmax((z_t - z_s) / T)))``, teacher detached.

    Note: this is not KL distillation. Minimising it *maximises* the entropy of the softmax of
    the logit difference, i.e. drives ``z_s`` towards ``z_t`` up to a per-sample constant shift.
    Implemented exactly as GRANQ.md section 3 step 4 states.
    """
    _check_logits(z_t, z_s)
    t = temperature
    return -(t * t) * softmax_entropy((z_t.detach() - z_s) / t).mean()


def kl_student_loss(z_t: Tensor, z_s: Tensor, temperature: float) -> Tensor:
    """Standard distillation: ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``, batch mean."""
    _check_logits(z_t, z_s)
    t = temperature
    log_p_t = F.log_softmax(z_t.detach() / t, dim=-1)
    log_p_s = F.log_softmax(z_s / t, dim=-1)
    return (t * t) * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def student_loss(z_t: Tensor, z_s: Tensor, cfg: LossConfig) -> Tensor:
    """Student objective selected by ``cfg.student_loss`` ("entropy" or "kl") at ``cfg.temperature``.

    The teacher logits are detached here; only the student receives gradients.
    """
    if cfg.student_loss == "entropy":
        return entropy_student_loss(z_t, z_s, cfg.temperature)
    if cfg.student_loss == "kl":
        return kl_student_loss(z_t, z_s, cfg.temperature)
    raise ValueError(f"unknown student loss {cfg.student_loss!r}; expected 'entropy' or 'kl'")
