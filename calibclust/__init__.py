"""calibclust: calibrated deep clustering of image folders.

Importing this package stays light (no torch): training code lives in submodules that
import torch themselves, so ``calibclust.serve`` and the CLI start fast on a serving box.
"""

__version__ = "0.1.0"

from calibclust.errors import CalibclustError, InputError  # noqa: E402

__all__ = ["__version__", "CalibclustError", "InputError"]
