"""``python -m calibclust.serve label ...``: the serving commands alone, without the plugin-discovered
``calibclust`` command set (for slim serving images, and so serve runs even when another plugin is
broken). Same behaviour and exit codes as ``calibclust label``."""

from __future__ import annotations

import argparse
import sys

from calibclust import __version__
from calibclust.errors import CalibclustError
from calibclust.serve.cli import register_bench_cli, register_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibclust.serve", description="calibclust serving commands")
    parser.add_argument("--version", action="version", version=f"calibclust {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_cli(subparsers)
    register_bench_cli(subparsers)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CalibclustError as exc:
        print(f"calibclust {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"calibclust {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
