"""The demo's settings: :class:`DemoConfig` (what ``calibclust demo``'s options and the Python
:func:`~calibclust.serve.demo.launch` take), its defaults, and :class:`DemoError`, the one error type
every part of the demo raises for a problem the user is shown as a message.

Imports only the standard library (``calibclust --help`` stays fast).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20.0
# calibclust.io.images.DEFAULT_MAX_PIXELS (label's default too), restated so that the demo's modules import
# only the standard library; tests/test_cli_names.py checks the two agree.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_CONCURRENCY = 2  # inference threads share the CPU cores; more would only queue inside ORT
DEFAULT_BATCH_PIXELS = 200_000_000  # per batch request, summed from image headers before decoding


@dataclass
class DemoConfig:
    model: str | os.PathLike
    host: str = DEFAULT_HOST
    port: int | None = DEFAULT_PORT  # None: Gradio picks a free one from 7860 up
    share: bool = False
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    examples: str | os.PathLike | None = None  # folder of example images
    max_examples: int = 12
    save_dir: str | os.PathLike | None = None  # where named models go (default: the model's folder)
    backend: str = "auto"
    concurrency: int = DEFAULT_CONCURRENCY
    work_dir: str | os.PathLike | None = None  # temporary files (default: a fresh temp folder)
    auth: tuple[str, str] | None = None  # Gradio's login (user, password); required when exposed
    insecure_no_auth: bool = False  # exposed without a login, knowingly
    max_batch_pixels: int = DEFAULT_BATCH_PIXELS

    @property
    def exposed(self) -> bool:
        """Reachable from other machines: a non-loopback address or a public share link."""
        if self.share:
            return True
        if self.host == "localhost":
            return False
        import ipaddress

        try:
            return not ipaddress.ip_address(self.host).is_loopback  # 127.0.0.0/8, ::1
        except ValueError:  # a host name (e.g. 127.example.org): treated as reachable
            return True

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)



class DemoError(Exception):
    """A problem to show the user as a message (never a traceback)."""
