"""Every choice-valued setting of the package, defined once, as ``str`` enums.

No torch import: the configuration front end validates YAML against these before it imports
anything heavy, and the library (optimizer, blocks, linear algebra, TN engine) uses the same
classes, so a choice can never be spelled two ways.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

__all__ = [
    "BudgetCosts",
    "Choice",
    "DistributedStrategy",
    "DtypeName",
    "FisherType",
    "Impl",
    "Inversion",
    "KFACApprox",
    "LossReduction",
    "LossType",
    "NormBlock",
    "Preconditioner",
    "QModel",
    "QModelJvp",
    "StepSize",
]

_C = TypeVar("_C", bound="Choice")


class Choice(str, Enum):
    """Base of the choice enums: prints as its value; :meth:`parse` names the allowed values."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def allowed(cls) -> str:
        """Return the allowed values, quoted and comma-separated (for error messages)."""
        return ", ".join(repr(m.value) for m in cls)

    @classmethod
    def parse(cls: type[_C], value: Any, name: str) -> _C:
        """Return the member for ``value`` (a member or its string).

        Args:
            value: The value to convert.
            name: The setting's name, used in the error message.

        Raises:
            ValueError: ``Invalid {name} value: {value!r} (allowed: ...)``.
        """
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"Invalid {name} value: {value!r} (allowed: {cls.allowed()})"
            ) from None


class KFACApprox(Choice):
    """How weight sharing (spatial positions, extra Linear dimensions) is approximated."""

    EXPAND = "expand"
    REDUCE = "reduce"


class FisherType(Choice):
    """Which output gradients build the gradient factor ``G``."""

    EMPIRICAL = "empirical"
    MC = "mc"
    TYPE2 = "type2"


class LossType(Choice):
    """Loss functions whose Fisher the optimizer knows."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"


class LossReduction(Choice):
    """Reduction of the per-sample losses, as in torch's ``reduction`` argument."""

    MEAN = "mean"
    SUM = "sum"


class Inversion(Choice):
    """How damped Kronecker factors are inverted."""

    EIGEN = "eigen"
    CHOLESKY = "cholesky"


class Preconditioner(Choice):
    r"""What a Kronecker block's eigenbasis is used with (see :mod:`kfac_tn.blocks.base`).

    ``kfac``: the Kronecker eigenvalues :math:`\lambda_G \lambda_A^\top`; ``ekfac``: scalings
    re-estimated in that eigenbasis from per-sample gradients (George et al., 2018).
    """

    KFAC = "kfac"
    EKFAC = "ekfac"


class NormBlock(Choice):
    """Curvature of normalization layers' scale and shift (see :mod:`kfac_tn.blocks.norm`).

    ``unitwise``: a 2×2 block per channel; ``diagonal``: its diagonal; ``skip``: no block
    (momentum SGD).
    """

    UNITWISE = "unitwise"
    DIAGONAL = "diagonal"
    SKIP = "skip"


class DistributedStrategy(Choice):
    """Where inverses live in data-parallel training (see :mod:`kfac_tn.optim.placement`)."""

    REPLICATE = "replicate"
    SHARD = "shard"


class DtypeName(Choice):
    """Floating dtypes allowed for factors and inverses, by name (``torch.<name>``)."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class QModel(Choice):
    """Curvature of the quadratic model used to judge a step (see :mod:`kfac_tn.optim.qmodel`)."""

    KRONECKER = "kronecker"
    EXACT = "exact"


class QModelJvp(Choice):
    """How the exact curvature's JVP is computed (see :mod:`kfac_tn.optim.qmodel`)."""

    AUTO = "auto"
    FORWARD = "forward"
    DIFFERENCE = "difference"


class StepSize(Choice):
    """How the length of a step is set (see :mod:`kfac_tn.optim.damping`)."""

    FIXED = "fixed"
    QMODEL = "qmodel"


class BudgetCosts(Choice):
    """Where ``curvature_budget`` takes the costs it plans with (:mod:`kfac_tn.optim.schedule`)."""

    MODEL = "model"
    MEASURED = "measured"


class Impl(Choice):
    """Implementation of a TN routine (see :mod:`kfac_tn.tn`)."""

    AUTO = "auto"
    TN = "tn"
    TN_SIMPLIFIED = "tn_simplified"
    STANDARD = "standard"
