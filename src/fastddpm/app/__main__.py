"""``python -m fastddpm.app`` (also ``fastddpm app``): the local web app."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main", "add_arguments"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to "
                        "the network)")
    p.add_argument("--port", type=int, default=7860, help="the port (default 7860)")
    p.add_argument("--max-runs", type=int, default=2, help="training runs at a time (default 2)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="the longest a training run may take (s)")
    p.add_argument("--quiet", action="store_true",
                   help="no Gradio start-up banner (the line with the address is still printed)")
    return p


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="fastddpm app", description="the fastddpm web app"))
    args = p.parse_args(argv)
    return run(args)


def run(args) -> int:
    if not 0 <= args.port <= 65535:
        print(f"fastddpm app: --port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.max_runs < 1 or not args.max_seconds > 0:
        print("fastddpm app: --max-runs must be >= 1 and --max-seconds > 0", file=sys.stderr)
        return 2
    import importlib.util
    if importlib.util.find_spec("gradio") is None:     # not imported: the server sets its env first
        print("fastddpm app: the web app needs Gradio: pip install 'fastddpm[app]'", file=sys.stderr)
        return 1
    from .server import serve
    try:
        serve(args.host, args.port, max_runs=args.max_runs, max_seconds=args.max_seconds, quiet=args.quiet)
    except OSError as exc:       # the port is taken, the address is not this machine's...
        print(f"fastddpm app: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
