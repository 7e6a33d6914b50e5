"""Import MONAI for inference without the optional packages that its package import loads but inference never uses.

``import monai`` imports every MONAI submodule (by design), and with them, through MONAI's ``optional_import``, every
optional package that is installed: PyTorch-Ignite for the engines and handlers, ``scipy.signal`` for the ultrasound
confidence map, matplotlib for the notebook helpers. Together they are more than half of MONAI's import time, and
``covid-monai infer`` uses none of them. MONAI is built to work without them (``optional_import`` hands back a
placeholder that raises only when used), so :func:`import_monai_for_inference` imports MONAI once with those
packages made unfindable, then makes them findable again: a later ``import ignite`` or ``import matplotlib`` in the
same process works as usual, but MONAI's own engines and handlers stay without Ignite for the rest of the process.

That is why only the ``covid-monai infer`` program does it (:func:`covid_monai.cli.console_main`), before anything
else imports MONAI, and never a library call: training, evaluation and ``python -m monai.bundle`` import MONAI whole.
Set ``COVID_MONAI_FULL_IMPORT=1`` to import MONAI whole for inference as well. ``tests/test_lean_import.py`` checks
that MONAI still imports this way and that inference then gives the same masks, so a MONAI release that starts to
need one of these packages fails there, loudly.
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["FULL_IMPORT_ENV", "NOT_NEEDED_FOR_INFERENCE", "import_monai_for_inference"]

logger = logging.getLogger(__name__)

NOT_NEEDED_FOR_INFERENCE = ("ignite", "scipy.signal", "matplotlib")
"""Packages ``import monai`` loads (when installed) that inference does not use."""

FULL_IMPORT_ENV = "COVID_MONAI_FULL_IMPORT"
"""Environment variable: set to ``1`` to import MONAI whole for inference too."""


class _Unfindable(importlib.abc.MetaPathFinder):
    """A meta path finder for which the given packages (and their submodules) are not installed."""

    def __init__(self, packages: Sequence[str]) -> None:
        self.packages = tuple(packages)

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if any(fullname == p or fullname.startswith(p + ".") for p in self.packages):
            raise ModuleNotFoundError(f"{fullname} is not imported for inference", name=fullname)
        return None


def import_monai_for_inference(not_needed: Sequence[str] = NOT_NEEDED_FOR_INFERENCE) -> bool:
    """Import MONAI (and ``monai.bundle``) with the packages ``not_needed`` unfindable while it imports.

    Does nothing when MONAI is already imported or ``COVID_MONAI_FULL_IMPORT`` is set to anything but ``0`` or empty.
    PyTorch is imported first, normally, so that only MONAI's optional imports are affected. Should MONAI fail to
    import without them (a release that needs one), what it imported is dropped and MONAI is imported whole, so the
    run goes on at the old speed (``tests/test_lean_import.py`` fails on such a release).

    Returns:
        Whether MONAI was imported here, without ``not_needed``.

    Example:
        >>> import_monai_for_inference()  # in a fresh `covid-monai infer` process
        True
    """
    if "monai" in sys.modules or os.environ.get(FULL_IMPORT_ENV, "") not in ("", "0"):
        return False
    importlib.import_module("torch")
    finder = _Unfindable(not_needed)
    sys.meta_path.insert(0, finder)
    try:
        _import_monai()
        return True
    except ImportError as error:
        logger.debug("MONAI did not import without %s (%s): importing it whole", ", ".join(not_needed), error)
        for name in [name for name in sys.modules if name == "monai" or name.startswith("monai.")]:
            del sys.modules[name]
    finally:
        sys.meta_path.remove(finder)
    _import_monai()
    return False


def _import_monai() -> None:
    importlib.import_module("monai")
    importlib.import_module("monai.bundle")  # not part of `import monai`; covid_monai.bundle parses configs with it
