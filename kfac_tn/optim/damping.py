r"""Self-tuning: Levenberg–Marquardt damping and quadratic-model step sizes.

**Adaptive damping** (``damping_adaptation=True``; Martens & Grosse 2015, §6.5). Every
``damping_adaptation_period`` steps the optimizer compares the objective's true change over the
step with the change its quadratic model predicted (:mod:`kfac_tn.optim.qmodel`), on the
step's own batch:

.. math::
    \rho = \frac{h(\theta + \Delta) - h(\theta)}{q(\Delta)}, \qquad
    \delta \leftarrow \begin{cases} \omega\,\delta & \rho > 3/4 \\
    \delta / \omega & \rho < 1/4 \\ \delta & \text{else} \end{cases}, \qquad
    \omega = \texttt{damping\_adaptation\_decay}^{\,T},

clamped to ``[min_damping, max_damping]``, in every param group that adapts (the group's
``damping`` value is the current damping: it is saved with the state dict and read by
``layer_settings``-free layers; a layer whose ``layer_settings`` fix the damping keeps it).
A step whose model predicts an increase (:math:`q > 0`, an overshoot) counts as a bad step.
Distributed, the three numbers are averaged over the workers first, so every rank takes the same
decision. Cost: one extra forward pass every :math:`T` steps (``qmodel="kronecker"``), plus one
forward-mode pass with ``qmodel="exact"``.

**Quadratic-model step size** (``step_size="qmodel"``; kfac-jax's adaptive learning rate). Every
step the proposed update :math:`\Delta` (learning rate, momentum, KL clip and weight decay
applied) is rescaled by the minimiser of the quadratic model along it, with the exact GGN and the
damping,

.. math::
    \alpha^* = \frac{-(\nabla L + \lambda\theta)^\top \Delta}
    {\Delta^\top (G + (\lambda + \delta) I) \Delta} \in [0, \alpha_{\max}],

and the momentum buffer with it. It costs one forward-mode pass per step; the learning rate then
only sets the direction's scale before the rescaling (``lr`` and a schedule still apply through
:math:`\alpha_{\max}` = ``max_step_scale``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["damping_factor", "levenberg_marquardt", "optimal_scale", "reduction_ratio"]


def levenberg_marquardt(
    damping: float,
    rho: float,
    *,
    omega: float,
    min_damping: float,
    max_damping: float,
    lower: float = 0.25,
    upper: float = 0.75,
) -> float:
    """Return the damping after a step with reduction ratio ``rho`` (module docstring).

    Args:
        damping: The current damping ``δ > 0``.
        rho: The reduction ratio (``nan``: no information, ``δ`` unchanged).
        omega: The factor ``ω`` in ``(0, 1)``.
        min_damping: Lower bound.
        max_damping: Upper bound.
        lower: Below this ratio the damping grows.
        upper: Above this ratio it shrinks.

    Returns:
        The new damping, within the bounds.
    """
    if not math.isnan(rho):  # -inf: an overshoot (see reduction_ratio)
        if rho > upper:
            damping *= omega
        elif rho < lower:
            damping /= omega
    return min(max(damping, min_damping), max_damping)


def reduction_ratio(actual: float, predicted: float) -> float:
    """Return ``ρ = actual / predicted`` for a step the quadratic model predicts to descend.

    A step whose model predicts an *increase* (``predicted > 0``: it overshoots the model's
    minimum) is a bad step, ``ρ = -inf`` (more damping); a zero or non-finite prediction carries
    no information (``nan``: the damping stays).
    """
    if not (math.isfinite(actual) and math.isfinite(predicted)) or predicted == 0:
        return math.nan
    return actual / predicted if predicted < 0 else -math.inf


def optimal_scale(linear: float, curvature: float, max_scale: float) -> float:
    r"""Return the minimiser of :math:`\alpha\,l + \tfrac12 \alpha^2 c` in ``[0, max_scale]``.

    Args:
        linear: :math:`l = g^\top \Delta`.
        curvature: :math:`c = \Delta^\top (G + \mu I) \Delta \ge 0`.
        max_scale: Upper bound of the scale.

    Returns:
        ``clamp(-l / c, 0, max_scale)``; ``max_scale`` if ``c`` is not positive but ``l < 0``,
        0 if the direction does not descend.
    """
    if not (math.isfinite(linear) and math.isfinite(curvature)) or linear >= 0:
        return 0.0
    if curvature <= 0:
        return max_scale
    return min(-linear / curvature, max_scale)


def damping_factor(group: Mapping[str, object]) -> float:
    """Return ``ω = decay ** period`` of a param group."""
    return float(group["damping_adaptation_decay"]) ** int(group["damping_adaptation_period"])
