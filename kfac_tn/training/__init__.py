"""The training front end behind ``kfac-tn``: config, data, models, loop, checkpoints, plots.

It builds on the library (:class:`kfac_tn.KFAC`, :mod:`kfac_tn.optim.hyperparams`,
:mod:`kfac_tn.enums`); nothing in the library imports it. It needs the ``train`` extra
(``pip install kfac_tn[train]``: PyYAML, tqdm, matplotlib, scikit-learn, torchvision).

Modules: :mod:`~kfac_tn.training.cli` (the ``kfac-tn`` command), :mod:`~kfac_tn.training.config`
(the typed YAML schema), :mod:`~kfac_tn.training.train` (the loop), :mod:`~kfac_tn.training.data`,
:mod:`~kfac_tn.training.models`, :mod:`~kfac_tn.training.checkpoint`,
:mod:`~kfac_tn.training.plots`.
"""
