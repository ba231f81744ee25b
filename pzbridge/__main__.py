"""Command line of pzbridge: run the demo, or show how a model lifts.

python -m pzbridge demo runs the end-to-end demo on small embedded models;
python -m pzbridge show MODULE:FACTORY builds your model with FACTORY, lifts
it and prints what it is made of (python -m pzbridge show core|gpt shows a
built-in example). The parser's description is this docstring's first
paragraph, so it is written as plain text (help output shows no markup).

Example:
    >>> build_parser().parse_args(["demo"]).command
    'demo'
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import pzbridge

BUILTIN_MODELS = ("core", "gpt")

_SHOW_EPILOG = """\
examples:
  python -m pzbridge show gpt
  python -m pzbridge show equinox.nn:MLP --args '{"in_size": 4, "out_size": 2, "width_size": 8, "depth": 2}'
  python -m pzbridge show my_models.py:build --example-shapes '[[8, 16]]' --html model.html

A factory parameter named rngs that --args does not give gets nnx.Rngs(SEED);
one named key gets jax.random.key(SEED). Mistakes exit with status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m pzbridge``.

    Example:
        >>> build_parser().parse_args(["demo", "--out", "x"]).out
        'x'
    """
    description = (__doc__ or "").split("\n\n")[0].replace("\n", " ")
    parser = argparse.ArgumentParser(prog="python -m pzbridge", description=description)
    parser.add_argument("--version", action="version", version=f"pzbridge {pzbridge.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the end-to-end demo on small embedded models (no download)")
    demo.add_argument("--out", default="pzbridge_demo_output", help="folder for HTML renderings and checkpoints")
    demo.add_argument("--quiet", action="store_true", help="print only the final report")
    show = commands.add_parser(
        "show", help="build a model with a factory, lift it and summarise it (or show a built-in example)",
        description="Build a model with MODULE:FACTORY, lift it, print a summary (layers by class, parameters "
                    "per top-level block, what stayed Foreign and why) and optionally write treescope HTML.",
        epilog=_SHOW_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("target", metavar="MODULE:FACTORY",
                      help="a module path importable from here (or a .py file), a colon, and the function or "
                           "class that builds the model; or core / gpt for a built-in example")
    show.add_argument("--args", default=None, metavar="JSON", help="keyword arguments of the factory, a JSON object")
    show.add_argument("--example-shapes", default=None, metavar="JSON",
                      help="shapes of example inputs, a JSON list such as [[8, 16]] (or {\"shape\": [8], "
                           "\"dtype\": \"int32\"} entries): lift traced on jax.ShapeDtypeStructs")
    show.add_argument("--seed", type=int, default=0, help="seed of the default rngs / key (default 0)")
    show.add_argument("--html", default=None, metavar="FILE", help="also write a treescope HTML rendering here")
    return parser


def _show_builtin(model_name: str, html: str | None) -> int:
    import jax
    import treescope

    from pzbridge.cli_show import write_html
    from pzbridge.cli_summary import format_summary, summarize

    if model_name == "gpt":
        from pzbridge.models.gpt import build_gpt

        model = build_gpt(init_base_rng=jax.random.key(0))
    else:
        from pzbridge.demo.core_demo import build_small_model

        model = build_small_model(jax.random.key(0))
    print(treescope.render_to_text(model))
    print()
    print(format_summary(summarize(model)))
    if html:
        print(write_html(model, html))
    return 0


def _show(args: argparse.Namespace) -> int:
    from pzbridge.cli_show import CommandLineError, show_factory

    try:
        if args.target in BUILTIN_MODELS and args.args is None and args.example_shapes is None:
            return _show_builtin(args.target, args.html)
        print(show_factory(args.target, args.args, args.example_shapes, args.html, args.seed))
    except CommandLineError as error:
        print(f"python -m pzbridge show: error: {error}", file=sys.stderr)
        return 2
    return 0


def _print_html_files(out: pathlib.Path) -> None:
    """Tells where the demo's renderings are and how to open them."""
    pages = sorted(out.glob("*.html"))
    if not pages:
        return
    print()
    print(f"treescope renderings ({len(pages)}) in {out.resolve()}; open one in a web browser (no network needed):")
    for page in pages:
        print(f"  {page.resolve().as_uri()}")


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code.

    Example:
        >>> main(["show", "nonsense"])
        2
    """
    args = build_parser().parse_args(argv)
    if args.command == "show":
        return _show(args)
    from pzbridge.demo import run_demo

    out = pathlib.Path(args.out)
    report = run_demo(out, verbose=not args.quiet)
    print()
    print(report.summary())
    _print_html_files(out)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
