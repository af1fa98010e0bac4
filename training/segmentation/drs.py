"""Difficulty-aware Re-weighting Strategy (DRS) of A&D (Wang & Li, NeurIPS 2023, §3.3).

Class weights for the difficulty-aware decoder's loss, from how the per-class Dice of the
denoising decoder D_ξ on the labeled batch changes step to step. Follows the ``Difficulty``
class of the official ``code/train_diffusion.py`` (used with ``accumulate_iters=50``) and its
helpers ``SoftDiceLoss`` (``code/utils/loss.py``) and ``EMA`` (``code/utils/__init__.py``).

Per step, with ``D_t`` the hard per-class Dice (argmax prediction vs. label, both one-hot,
summed over batch and space, background included)::

    D_t    = (2·TP + ε) / (2·TP + FP + FN + ε + ε)     # SoftDiceLoss(smooth=ε) adds 1e-8 again
    Δ      = D_t − D_{t−1}
    learn  = max(Δ, 0) · ln(D_t / D_{t−1});  unlearn = min(Δ, 0) · ln(D_t / D_{t−1})
    L̄ ← m·L̄ + (1 − m)·learn;  Ū ← m·Ū + (1 − m)·unlearn;  Ē ← m·Ē + (1 − m)·(1 − D_t)
    w      = ((Ū + ε) / (L̄ + ε))^(1/5) · Ē · C

with ``m = (50 − 1)/50 = 0.98``, ``ε = 1e-8`` and the official initial state ``D_0 = ε``,
``L̄ = Ū = 0``, ``Ē = 1``. A class absent from both prediction and label has ``D_t = 1/2``
(``ε / 2ε``), as in the official code.
"""

from __future__ import annotations

from typing import Any

import torch

from medssl.training.segmentation.losses import as_label_map

__all__ = ["DifficultyWeights", "hard_batch_dice"]

_STATE_KEYS = ("last_dice", "learn", "unlearn", "dice_weight")


def hard_batch_dice(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-8
) -> torch.Tensor:
    """Per-class Dice of ``argmax(logits)`` against ``target`` over batch and space.

    Args:
        logits: ``(B, C, *spatial)`` scores (logits or probabilities).
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels in ``[0, C)``.
        smooth: added to numerator and denominator (official ``SoftDiceLoss(smooth=1e-8)``,
            which also adds a further 1e-8 to the denominator; reproduced here).

    Returns:
        ``(C,)`` float32 Dice per class, background included.
    """
    target = as_label_map(logits, target, check_range=True)
    c = logits.shape[1]
    # Confusion matrix by counting (exact integers; no (B, C, *spatial) one-hot in memory).
    pairs = target.reshape(-1) * c + logits.argmax(dim=1).reshape(-1)
    confusion = torch.bincount(pairs, minlength=c * c).reshape(c, c).to(torch.float32)
    tp = confusion.diagonal()
    fp = confusion.sum(dim=0) - tp  # predicted as the class, labeled otherwise
    fn = confusion.sum(dim=1) - tp  # labeled as the class, predicted otherwise
    return (2 * tp + smooth) / (2 * tp + fp + fn + smooth + 1e-8)


class DifficultyWeights:
    """EMA state of DRS; :meth:`update` returns the class weights of this step.

    Args:
        num_classes: ``C``, background included.
        momentum: EMA momentum ``m`` (official ``(accumulate_iters − 1)/accumulate_iters``
            with ``accumulate_iters = 50``).
        eps: ``ε`` of the Dice smoothing, the initial ``D_0`` and the learn/unlearn ratio.

    State lives on the device of the last ``logits`` passed to :meth:`update` (CPU at first).
    """

    def __init__(self, num_classes: int, momentum: float = 0.98, eps: float = 1e-8) -> None:
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.num_classes = num_classes
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.steps = 0
        self.last_dice = torch.full((num_classes,), self.eps)
        self.learn = torch.zeros(num_classes)
        self.unlearn = torch.zeros(num_classes)
        self.dice_weight = torch.ones(num_classes)

    def _to(self, device: torch.device) -> None:
        for key in _STATE_KEYS:
            setattr(self, key, getattr(self, key).to(device))

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Advance the state by one labeled batch and return the weights.

        Args:
            logits: ``(B, C, Z, Y, X)`` output of the denoising decoder D_ξ (detached or not).
            target: ``(B, 1, Z, Y, X)`` or ``(B, Z, Y, X)`` integer labels.

        Returns:
            ``(C,)`` float32 weights ``w`` (no gradient) on the logits' device.
        """
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, expected {self.num_classes}")
        self._to(logits.device)
        dice = hard_batch_dice(logits.detach(), target, smooth=self.eps)
        delta = dice - self.last_dice
        log_ratio = torch.log(dice / self.last_dice)
        learn = delta.clamp(min=0) * log_ratio
        unlearn = delta.clamp(max=0) * log_ratio
        m = self.momentum
        self.learn = m * self.learn + (1 - m) * learn
        self.unlearn = m * self.unlearn + (1 - m) * unlearn
        self.dice_weight = m * self.dice_weight + (1 - m) * (1 - dice)
        self.last_dice = dice
        self.steps += 1
        difficulty = ((self.unlearn + self.eps) / (self.learn + self.eps)).pow(0.2)
        return difficulty * self.dice_weight * self.num_classes

    def state_dict(self) -> dict[str, Any]:
        """The EMA state (CPU tensor copies) and the hyper-parameters, for checkpoints."""
        state: dict[str, Any] = {k: getattr(self, k).detach().cpu().clone() for k in _STATE_KEYS}
        state.update(
            num_classes=self.num_classes, momentum=self.momentum, eps=self.eps, steps=self.steps
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the class count must match."""
        missing = [k for k in (*_STATE_KEYS, "num_classes") if k not in state]
        if missing:
            raise KeyError(f"DifficultyWeights state lacks {missing}")
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError(
                f"state is for {state['num_classes']} classes, this object has {self.num_classes}"
            )
        device = self.last_dice.device
        for key in _STATE_KEYS:
            value = torch.as_tensor(state[key], dtype=torch.float32)
            if value.shape != (self.num_classes,):
                raise ValueError(f"{key} must have shape ({self.num_classes},), got {value.shape}")
            setattr(self, key, value.to(device).clone())
        self.momentum = float(state.get("momentum", self.momentum))
        self.eps = float(state.get("eps", self.eps))
        self.steps = int(state.get("steps", 0))
