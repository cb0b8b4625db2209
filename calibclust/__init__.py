"""calibclust: calibrated deep clustering of image folders.

Importing this package stays light (no torch): training code lives in submodules that
import torch themselves, so ``calibclust.serve`` and the CLI start fast on a serving box.
"""

__version__ = "0.1.0"

from calibclust.errors import CalibclustError, InputError  # noqa: E402

__all__ = ["__version__", "CalibclustError", "InputError", "FittedModel", "fit", "load"]


def __getattr__(name: str):
    # The Python API (calibclust.app) is resolved on first use, so `import calibclust` stays light.
    if name in ("fit", "load", "FittedModel"):
        import calibclust.app

        return getattr(calibclust.app, name)
    raise AttributeError(f"module 'calibclust' has no attribute {name!r}")
