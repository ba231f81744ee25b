"""``python -m pzbridge show MODULE:FACTORY``: build a user's model, lift it, summarise it.

``MODULE`` is a module path importable from the current directory
(``mypkg.models``) or a Python file (``path/to/models.py``); ``FACTORY`` is a
function or class in it that returns an ``eqx.Module`` or ``nnx.Module``
(a model already made of pzbridge layers is shown as it is). ``--args`` gives
the factory's keyword arguments as a JSON object.

Randomness, decided here so that factories need no wrapper: a factory
parameter named ``rngs`` that ``--args`` does not give gets
``nnx.Rngs(SEED)``, and one named ``key`` gets ``jax.random.key(SEED)``
(``SEED`` is ``--seed``, 0 by default). With ``--example-shapes`` (a JSON list
with one entry per positional input: a shape such as ``[8, 16]`` for float32,
or ``{"shape": [8], "dtype": "int32"}``) the model is lifted *traced*, on
``jax.ShapeDtypeStruct`` s, so modules without a rule become explicit layers
where their code allows; nothing is computed.

Every mistake a user can make on the command line (a bad ``MODULE:FACTORY``,
bad JSON, a factory that raises, a model that does not lift) raises
:class:`CommandLineError`, which the entry point prints as one line and
turns into exit status 2.

Example:
    >>> parse_target("mypkg.models:build")
    ('mypkg.models', 'build')
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

from pzbridge.cli_summary import format_summary, summarize
from pzbridge.core.errors import LiftError, PzbridgeError


class CommandLineError(PzbridgeError, ValueError):
    """A command-line mistake; ``python -m pzbridge`` prints it as one line and exits with status 2.

    Example:
        >>> issubclass(CommandLineError, PzbridgeError)
        True
    """


def parse_target(target: str) -> tuple[str, str]:
    """Splits ``MODULE:FACTORY`` (the last ``:`` separates, so ``C:\\x.py:f`` works).

    Raises:
      CommandLineError: If there is no ``:`` or either side is empty.

    Example:
        >>> parse_target("models.py:make")
        ('models.py', 'make')
    """
    module, sep, factory = target.rpartition(":")
    if not sep or not module or not factory:
        raise CommandLineError(
            f"expected MODULE:FACTORY, found {target!r}. Fix: name a module (or .py file) and the function that "
            "builds the model, e.g. `python -m pzbridge show mypkg.models:build_model`."
        )
    return module, factory


def _import_file(path: pathlib.Path) -> Any:
    name = f"pzbridge_show_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CommandLineError(f"cannot import {str(path)!r} as Python. Fix: pass a .py file or a module path.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Dataclasses (so eqx.Module classes) look their module up here.
    spec.loader.exec_module(module)
    return module


def load_factory(target: str) -> Callable[..., Any]:
    """Imports the factory that ``MODULE:FACTORY`` names.

    Raises:
      CommandLineError: If the module cannot be imported (its own error is
        quoted) or has no callable named ``FACTORY``.

    Example:
        >>> load_factory("pzbridge.models.gpt:build_gpt").__name__
        'build_gpt'
    """
    module_name, factory_name = parse_target(target)
    looks_like_file = module_name.endswith(".py") or os.sep in module_name or "/" in module_name
    try:
        if looks_like_file:
            path = pathlib.Path(module_name)
            if not path.is_file():
                raise CommandLineError(f"no file {module_name!r} (from {target!r}). Fix: check the path, relative "
                                       f"to the current directory {os.getcwd()!r}.")
            module = _import_file(path)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # `python -m` does this; a direct main() call may not have.
            module = importlib.import_module(module_name)
    except CommandLineError:
        raise
    except Exception as error:  # the user's module may raise anything on import
        raise CommandLineError(
            f"importing {module_name!r} failed ({type(error).__name__}: {_first_line(error)}). Fix: run from the "
            "directory the module is importable from, or pass the path of its .py file."
        ) from error
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        found = "nothing" if factory is None else type(factory).__name__
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:8]
        raise CommandLineError(
            f"{module_name!r} has no callable {factory_name!r} (found {found}). Fix: name one of its functions or "
            f"classes, e.g. {', '.join(public) or 'a function that returns the model'}."
        )
    return factory


def parse_json(text: str | None, option: str, expected: type) -> Any:
    """Parses an option's JSON value and checks its top-level type.

    Example:
        >>> parse_json('{"width": 8}', "--args", dict)
        {'width': 8}
    """
    if text is None:
        return expected()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandLineError(f"{option} is not valid JSON ({error.msg} at column {error.colno} of {text!r}). "
                               "Fix: quote it for the shell, e.g. --args '{\"width\": 8}'.") from None
    if not isinstance(value, expected):
        example = "'{\"width\": 8}'" if expected is dict else "'[[8, 16]]'"
        raise CommandLineError(f"{option} must be a JSON {'object' if expected is dict else 'list'}, found "
                               f"{type(value).__name__} {text!r}. Fix: pass e.g. {option} {example}.")
    return value


def example_inputs(shapes: list[Any]) -> list[Any]:
    """``jax.ShapeDtypeStruct`` s from ``--example-shapes`` entries (``[8, 16]`` or ``{"shape":..., "dtype":...}``).

    Example:
        >>> example_inputs([[8, 16], {"shape": [8], "dtype": "int32"}])
        [ShapeDtypeStruct(shape=(8, 16), dtype=float32), ShapeDtypeStruct(shape=(8,), dtype=int32)]
    """
    import jax
    import numpy as np

    structs = []
    for index, entry in enumerate(shapes):
        shape, dtype = (entry.get("shape"), entry.get("dtype", "float32")) if isinstance(entry, dict) else (entry,
                                                                                                           "float32")
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise CommandLineError(
                f"--example-shapes entry {index} is {entry!r}, expected a list of sizes or an object with \"shape\". "
                "Fix: one shape per positional input, e.g. --example-shapes '[[8, 16]]'."
            )
        try:
            structs.append(jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype)))
        except TypeError:
            raise CommandLineError(f"--example-shapes entry {index}: unknown dtype {dtype!r}. Fix: use a NumPy "
                                   "dtype name such as \"float32\" or \"int32\".") from None
    return structs


def with_default_randomness(factory: Callable[..., Any], kwargs: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """``kwargs`` plus ``rngs=nnx.Rngs(seed)`` / ``key=jax.random.key(seed)`` where the factory takes them.

    Example:
        >>> def build(width, key): ...
        >>> sorted(with_default_randomness(build, {"width": 2}, 0))
        ['key', 'width']
    """
    signature = _signature(factory)
    if signature is None:
        return dict(kwargs)
    parameters = signature.parameters
    filled = dict(kwargs)
    if "rngs" in parameters and "rngs" not in filled:
        from flax import nnx

        filled["rngs"] = nnx.Rngs(seed)
    if "key" in parameters and "key" not in filled:
        import jax

        filled["key"] = jax.random.key(seed)
    return filled


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    """The factory's parameters; for a class, its ``__init__``'s (NNX's metaclass hides them otherwise)."""
    try:
        if isinstance(factory, type):
            signature = inspect.signature(factory.__init__)
            return signature.replace(parameters=list(signature.parameters.values())[1:])  # Drop `self`.
        return inspect.signature(factory)
    except (TypeError, ValueError):  # Builtins and some C callables have no signature.
        return None


def build_model(factory: Callable[..., Any], kwargs: Mapping[str, Any], seed: int = 0) -> Any:
    """Calls the factory (see :func:`with_default_randomness`); its errors become a :class:`CommandLineError`.

    Example:
        >>> type(build_model(lambda width: [width], {"width": 2})).__name__
        'list'
    """
    name = getattr(factory, "__qualname__", repr(factory))
    try:
        return factory(**with_default_randomness(factory, kwargs, seed))
    except Exception as error:  # the user's factory may raise anything
        raise CommandLineError(
            f"{name}(**{dict(kwargs)!r}) raised {type(error).__name__}: {_first_line(error)}. Fix: give --args the "
            f"keyword arguments of {name}{_parameter_summary(factory)} as a JSON object."
        ) from error


def _parameter_summary(factory: Callable[..., Any]) -> str:
    """`` (required: a, b; optional: c, d)``: the factory's keyword parameters, short enough for one line."""
    signature = _signature(factory)
    if signature is None:
        return ""
    usable = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = [p.name for p in usable if p.default is p.empty]
    optional = [p.name for p in usable if p.default is not p.empty]
    shown = ", ".join(optional[:6]) + (", ..." if len(optional) > 6 else "")
    return f" (required: {', '.join(required) or 'none'}; optional: {shown or 'none'})"


def lift_model(model: Any, examples: list[Any], strict: bool = False) -> Any:
    """Lifts an ``eqx.Module`` / ``nnx.Module`` (traced when ``examples`` is not empty); pzbridge layers pass through.

    Example:
        >>> import jax, equinox as eqx
        >>> type(lift_model(eqx.nn.Linear(2, 3, key=jax.random.key(0)), [])).__name__
        'LiftedModel'
    """
    from pzbridge.bridge.api import lift
    from pzbridge.nn.layer import Layer

    if isinstance(model, Layer):
        return model
    try:
        return lift(model, *examples, strict=strict)
    except LiftError as error:
        if strict:
            raise
        raise CommandLineError(f"lifting failed: {_first_line(error)}") from error
    except Exception as error:  # e.g. example shapes the model cannot be called on
        hint = ("Fix: give --example-shapes the shapes the model's __call__ takes (one entry per positional "
                "input), or leave it out to lift without tracing.") if examples else (
                "Fix: return the model itself (an eqx.Module or nnx.Module) from the factory.")
        raise CommandLineError(f"lifting {type(model).__name__} failed ({type(error).__name__}: "
                               f"{_first_line(error)}). {hint}") from error


def foreign_reasons(model: Any, lifted: Any, examples: list[Any]) -> dict[str, str]:
    """Why modules stayed ``Foreign``: the lifter's own reason for the first, a general one (key ``""``) for all.

    Without example inputs nothing is traced, so every module without a rule
    stays Foreign. With them, a strict lift stops at the first module that
    cannot be traced and names it and the reason; that reason is keyed by the
    module's path (the one :func:`~pzbridge.cli_summary.walk_modules` gives).

    Example:
        >>> import pzbridge as pzb
        >>> foreign_reasons(None, pzb.nn.Identity(), [])
        {}
    """
    if not summarize(lifted).foreign:
        return {}
    if not examples:
        return {"": "no lifting rule for these classes, and nothing was traced. Fix: pass --example-shapes to "
                    "trace their __call__ into pzbridge layers."}
    general = ("no lifting rule, and tracing did not turn it into layers (its own code, or a child's, could "
               "not be traced).")
    try:
        lift_model(model, examples, strict=True)
    except LiftError as error:
        message = _first_line(error).split(" Fix:")[0].replace(" and strict=True", "")
        where, sep, rest = message.partition(": ")
        path = "" if where == "<root>" else where
        if sep and path in {p if p != "<root>" else "" for p, _, _ in summarize(lifted).foreign}:
            return {path or "<root>": rest, "": general}
        return {"": f"{general} The lifter's first reason: {message}"}
    except CommandLineError as error:  # The strict lift failed otherwise: say so, the summary stands.
        return {"": f"{general} (A strict lift, run to find the reason, failed: {error})"}
    return {"": "no lifting rule (a strict traced lift succeeded, so these come from a pzbridge fallback)."}


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.splitlines()[0].split())


def show_factory(target: str, args_json: str | None = None, shapes_json: str | None = None,
                 html: str | None = None, seed: int = 0) -> str:
    """Builds, lifts and summarises the model a factory returns; writes treescope HTML when asked.

    Args:
      target: ``MODULE:FACTORY``.
      args_json: The factory's keyword arguments as a JSON object.
      shapes_json: Example input shapes as a JSON list (traced lifting).
      html: Where to write the treescope rendering (optional).
      seed: Seed of the default ``rngs`` / ``key``.

    Returns:
      The text to print.

    Raises:
      CommandLineError: For any mistake on the command line.

    Example:
        >>> text = show_factory("equinox.nn:MLP", '{"in_size": 4, "out_size": 2, "width_size": 8, "depth": 1}')
        >>> text.splitlines()[0]
        'equinox.nn:MLP -> MLP (equinox), lifted without tracing'
    """
    factory = load_factory(target)
    kwargs = parse_json(args_json, "--args", dict)
    examples = example_inputs(parse_json(shapes_json, "--example-shapes", list))
    model = build_model(factory, kwargs, seed)
    lifted = lift_model(model, examples)
    framework = getattr(lifted, "framework", "pzbridge")
    how = f"traced on {', '.join(_describe(e) for e in examples)}" if examples else "without tracing"
    lines = [f"{target} -> {type(model).__name__} ({framework}), lifted {how}",
             format_summary(summarize(lifted), foreign_reasons(model, lifted, examples))]
    if html:
        lines.append(write_html(lifted, html))
    else:
        lines.append("(add --html FILE to write an interactive treescope rendering)")
    return "\n".join(lines)


def _describe(struct: Any) -> str:
    return f"{struct.dtype}{list(struct.shape)}".replace(" ", "")


def write_html(tree: Any, html: str) -> str:
    """Writes the treescope HTML of ``tree``; returns the line telling where it is and how to open it.

    Example:
        >>> import tempfile, pzbridge as pzb
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_html(pzb.nn.Identity(), f"{d}/m.html").startswith("wrote ")
        True
    """
    import treescope

    path = pathlib.Path(html)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(treescope.render_to_html(tree))
    except OSError as error:
        raise CommandLineError(f"cannot write {html!r} ({error.strerror}). Fix: pass a writable path to --html.")
    return f"wrote {path} (open {path.resolve().as_uri()} in a web browser; it needs no network)"
