"""Exceptions that the CLI turns into a message and an exit code instead of a traceback, and the
exit codes themselves (one definition for every command)."""

# 0 ok, 1 failure, 2 bad usage, 3 finished with some inputs failed (e.g. unreadable images).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


class CalibclustError(Exception):
    """A failure the user can act on (bad file, inconsistent model, missing dependency).

    The CLI prints ``str(exc)`` and exits with ``exit_code``.
    """

    exit_code = EXIT_FAILURE


class InputError(CalibclustError):
    """Bad usage or arguments that argparse could not catch (exit code 2)."""

    exit_code = EXIT_USAGE


class MissingDependencyError(CalibclustError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, purpose: str = ""):
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"{package} is not installed{what}. Install it with: pip install 'calibclust[{extra}]'"
        )
        self.package = package
        self.extra = extra


def require(module: str, extra: str, purpose: str = ""):
    """Import an optional module, or raise MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised where the extra is absent
        raise MissingDependencyError(module.split(".")[0], extra, purpose) from exc
