"""Command-line options generated from the configuration dataclasses: one home per option.

Every field of a configuration dataclass is one option. Its flag is the field name with dashes
(``max_tokens`` -> ``--max-tokens``), its default the field's default, its help text
``metadata["help"]``. Other metadata keys:

* ``parse``: a function from the command-line string to the value (default: the field's type);
* ``choices``: the allowed values;
* ``flag``: a different flag name (``CorpusConfig.seed`` is ``--split-seed``);
* ``const``: the value when the flag is given without one (``--rank-gates`` alone means "shared");
* ``metavar``: the name shown for the value.

Booleans get ``--name`` / ``--no-name``. Adding an option is adding a field: the CLI, ``--config``
files, run folders' config.json and the Python API all read it from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any


def option(default: Any, help: str, **metadata) -> Any:
    """A dataclass field with its command-line help (and optional ``parse``, ``choices``, ``flag``...)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def parse_optional_int(text: str) -> int | None:
    """ "none" / "all" -> None, else an int (a cap that can be lifted)."""
    return None if text.strip().lower() in ("none", "all") else int(text)


def parse_optional_str(text: str) -> str | None:
    """ "none" -> None, else the text (a column name that can be switched off)."""
    return None if text.strip().lower() == "none" else text


def parse_csv(text: str) -> tuple[str, ...]:
    """ "a, b,c" -> ("a", "b", "c")."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``str`` -> str (``annotation``: a resolved type hint)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0] if len(args) == 1 else str
    return annotation


def _parser_of(f: dataclasses.Field, hint: Any) -> Callable[[str], Any]:
    """The field's string parser; its ValueError becomes argparse's usage error with the same message."""
    parse = f.metadata.get("parse")
    if parse is None:
        base = _base_type(hint)
        parse = base if base in (int, float, str) else str

    def parse_option(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                str(err)
                if parse is f.metadata.get("parse")
                else f"expected {getattr(parse, '__name__', 'a value')}, got {text!r}"
            ) from None

    parse_option.__name__ = getattr(parse, "__name__", "value")
    return parse_option


def dest(section: str, name: str) -> str:
    """The argparse attribute of a field (unique across sections)."""
    return f"{section}__{name}" if section else name


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    section: str,
    skip: Iterable[str] = (),
    only: Iterable[str] | None = None,
    suppress_defaults: bool = False,
) -> None:
    """Add one option per field of the dataclass ``cls`` (``skip`` / ``only`` select fields).

    ``suppress_defaults``: an option not given leaves no attribute (for commands whose defaults come
    from elsewhere, e.g. ``adapt`` takes the source run's settings).
    """
    skip, only = set(skip), None if only is None else set(only)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only) or "help" not in f.metadata:
            continue
        flag = f.metadata.get("flag", f"--{f.name.replace('_', '-')}")
        default = argparse.SUPPRESS if suppress_defaults else f.default
        help_text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %: a literal % is %%
        kwargs: dict[str, Any] = {"dest": dest(section, f.name), "default": default, "help": help_text}
        if _base_type(hints[f.name]) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kwargs["type"] = _parser_of(f, hints[f.name])
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["metavar"] = f.metadata.get("metavar", f.name.upper())
        if "const" in f.metadata:
            kwargs.update(nargs="?", const=f.metadata["const"])
        parser.add_argument(flag, **kwargs)


def section_values(namespace: argparse.Namespace, cls: type, section: str) -> dict[str, Any]:
    """The given values of ``cls``'s fields in ``namespace`` (fields without an attribute are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        key = dest(section, f.name)
        if hasattr(namespace, key):
            out[f.name] = getattr(namespace, key)
    return out


def _file_value(f: dataclasses.Field, hint: Any, value: Any, where: str) -> Any:
    """A field's value as read from a JSON file, checked against its type: what the CLI would give for it.

    JSON has no infinity, so floats are written as "inf" / "-inf" / "nan" (see ``io/artifacts.py``) and
    read back here; a string for a field with a ``parse`` goes through the CLI's parser.
    """
    args = typing.get_args(hint)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)] if args and typing.get_origin(hint) is not tuple else [hint]
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} must not be null")
    if isinstance(value, str) and "parse" in f.metadata:
        try:
            return f.metadata["parse"](value)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    for kind in kinds:
        origin = typing.get_origin(kind)
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ValueError(
                    f"{where} must be a float, got an integer too large for one ({len(str(value))} digits)"
                ) from None
        if kind is float and isinstance(value, str) and value in ("inf", "-inf", "nan"):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
        if origin is tuple and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    expected = " or ".join(getattr(k, "__name__", str(k)) for k in kinds) + (" or null" if optional else "")
    raise ValueError(f"{where} must be {expected}, got {value!r}")


def values_from_file(cls: type, values: Any, where: str) -> dict[str, Any]:
    """The fields of ``cls`` in ``values`` (a mapping read from a JSON file), each checked against its type
    (:func:`_file_value`); unknown keys and a value that is not a mapping are refused, naming ``where``."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a JSON object of settings, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return {k: _file_value(fields[k], hints[k], v, f"{where}.{k}") for k, v in values.items()}
