"""Loss terms (SPEC §1.4, §5.3): one file per loss, each a pure function plus its registration.

Importing this package imports every module in it, so a new file registers its loss by itself
(``apd.losses.registry``)."""

import importlib
import pkgutil

from apd.losses.act_recon import act_recon_loss
from apd.losses.faithfulness import faithfulness_loss
from apd.losses.lp_sparsity import lp_sparsity_loss
from apd.losses.minimality import minimality_loss
from apd.losses.registry import LOSSES, Loss, losses_for, register_loss
from apd.losses.simplicity import simplicity_loss

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["faithfulness_loss", "minimality_loss", "simplicity_loss", "act_recon_loss", "lp_sparsity_loss",
           "LOSSES", "Loss", "losses_for", "register_loss"]  # fmt: skip
