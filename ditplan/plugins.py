"""User plugins: modules that register their own strategies (``ditplan.strategies.register``), model families
(``ditplan.models.family.register_family``) or feature extractors (torch-fidelity's
``register_feature_extractor``) when imported (``--plugin MODULE``)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from ditplan.errors import UserError


def import_plugins(modules: Sequence[str]) -> None:
    """Import ``modules`` in this process (Ray workers import them again for each trial); a module that
    cannot be found is a one-line :class:`UserError` naming it."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise UserError(f"--plugin {module}: cannot import it ({err}); give an importable module "
                            "(on PYTHONPATH or installed)") from None
