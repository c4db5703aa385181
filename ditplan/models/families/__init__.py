"""The model families ditplan knows, one module each; importing this package registers them.

A third-party family is a module that subclasses :class:`ditplan.models.family.ModelAdapter` and
registers it with :func:`ditplan.models.family.register_family`; pass it to ``--plugin``.
"""

from ditplan.models.families import dit, flux, pixart, qwenimage, sd3  # noqa: F401  (registers the built-in families)
from ditplan.models.family import (
    FAMILIES,
    ModelAdapter,
    family_of,
    pipeline_family,
    register_family,
)

__all__ = ["FAMILIES", "ModelAdapter", "family_of", "pipeline_family", "register_family"]
