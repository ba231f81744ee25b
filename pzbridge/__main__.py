"""Command line: ``python -m pzbridge demo | show``.

Example:
    >>> build_parser().parse_args(["demo"]).command
    'demo'
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m pzbridge``.

    Example:
        >>> build_parser().parse_args(["demo", "--out", "x"]).out
        'x'
    """
    parser = argparse.ArgumentParser(prog="python -m pzbridge", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the end-to-end demo on small embedded models (no download)")
    demo.add_argument("--out", default="pzbridge_demo_output", help="folder for HTML renderings and checkpoints")
    demo.add_argument("--quiet", action="store_true", help="print only the final report")
    show = commands.add_parser("show", help="print the lifted structure of a built-in example model")
    show.add_argument("model", choices=["core", "gpt"], help="which example model")
    show.add_argument("--html", default=None, help="also write a treescope HTML rendering here")
    return parser


def _show(model_name: str, html: str | None) -> int:
    import jax
    import treescope

    if model_name == "gpt":
        from pzbridge.models.gpt import build_gpt

        model = build_gpt(init_base_rng=jax.random.key(0))
    else:
        from pzbridge.demo.core_demo import build_small_model

        model = build_small_model(jax.random.key(0))
    print(treescope.render_to_text(model))
    if html:
        pathlib.Path(html).write_text(treescope.render_to_html(model))
        print(f"wrote {html}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "show":
        return _show(args.model, args.html)
    from pzbridge.demo import run_demo

    report = run_demo(pathlib.Path(args.out), verbose=not args.quiet)
    print()
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
