"""Old location of the capture hooks (now :mod:`kfac_tn.optim.hooks`); kept for one release."""

from kfac_tn.optim.hooks import GradCallback, HookSet

__all__ = ["GradCallback", "HookSet"]
