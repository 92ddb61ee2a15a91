"""Property test: any settings, from a config.json or the command line, give a run or one clear line.

``hypothesis`` writes ``--config`` files (every section and field, values of every JSON type and the extremes:
huge and negative numbers, "inf", "nan", "learn", "none", empty and odd strings, lists, objects, top-level
non-objects, unknown keys) and command lines of option values. The settings must build a run spec or be
refused with ``ValueError`` (one short line naming the setting); a command line is refused by argparse's
usage error or gives a spec. Nothing is written. The default budget is small (the fast suite);
``BORA_PYRO_FUZZ_EXAMPLES=N`` runs N examples per test, and ``experiments/fuzz_inputs.py --configs N`` trains on
the accepted ones end to end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bora_pyro.cli import _spec_from_args, build_parser
from bora_pyro.runs.spec import SECTIONS, RunSpec

settings.register_profile(
    "bora-pyro-config-fuzz",
    max_examples=int(os.environ.get("BORA_PYRO_FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FUZZ = settings.get_profile("bora-pyro-config-fuzz")
FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
TOP = [f.name for f in dataclasses.fields(RunSpec) if f.name not in SECTIONS]
EXTREMES = [
    0, 1, -1, 2, 7, 2**31, 2**63, -(2**63), 10**400, 0.0, -0.0, 1e-320, 0.5, 1e308, "inf", "-inf", "nan", "learn",
    "none", "all", "", " ", "0", "1e-3", "flat", "normal:1", "normal:0", "lognormal:nan,2", "gamma:1,1", "gamma:-1,1",
    "shared", "per-task", "map", "vi", "cosine", "constant", "split", "truncate", "auto", "disk", "memory", "cpu",
    "cuda", "{task}: ", "{task}{0}", "%s", "q_proj", "c_attn", "x" * 300, "é", "\x00", True, False, None, [], ["a"],
    [1, 2], {}, {"a": 1},
]  # fmt: skip
MESSAGE_LIMIT = 3000


def values() -> st.SearchStrategy[object]:
    return st.one_of(
        st.sampled_from(EXTREMES),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
        st.lists(st.sampled_from(["a", "q_proj", "Genesis", 1]), max_size=3),
    )


@st.composite
def config_files(draw) -> object:
    """A config file's parsed JSON: mostly objects of known sections and fields, sometimes anything."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.one_of(st.sampled_from([[], [1], "x", 3, None, True]), st.lists(values(), max_size=3)))
    config: dict = {}
    for name in draw(st.lists(st.sampled_from(TOP), max_size=3, unique=True)):
        config[name] = draw(values())
    for section in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=5, unique=True)):
        if draw(st.integers(0, 14)) == 0:
            config[section] = draw(values())  # a section that is not an object
            continue
        keys = draw(st.lists(st.sampled_from(FIELDS[section]), max_size=4, unique=True))
        config[section] = {k: draw(values()) for k in keys}
        if draw(st.integers(0, 14)) == 0:
            config[section][draw(st.text(max_size=8))] = 1  # an unknown key
    return config


def _flag(section: str, name: str) -> str:
    cls = SECTIONS.get(section, RunSpec)
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.metadata.get("flag", f"--{name.replace('_', '-')}")


@st.composite
def command_lines(draw) -> list[str]:
    """``train`` command lines with option values drawn like the config values (as text)."""
    argv = ["train", "--out", "unused"]
    options = [("", n) for n in TOP] + [(s, n) for s, names in FIELDS.items() for n in names]
    for section, name in draw(st.lists(st.sampled_from(options), max_size=5, unique=True)):
        value = draw(values())
        argv += [_flag(section, name), value if isinstance(value, str) else str(value)]
    return argv


def one_line(err: BaseException) -> bool:
    text = str(err)
    return bool(text) and "\n" not in text and len(text) <= MESSAGE_LIMIT and "Traceback" not in text


def attempt(fn, *errors: type[BaseException]) -> tuple[object, BaseException | None]:
    """``(fn(), None)``, or ``(None, the error)`` for one of ``errors``."""
    try:
        return fn(), None
    except errors as err:
        return None, err


@FUZZ
@given(config_files())
def test_any_config_file_gives_a_spec_or_one_line(config):
    spec, err = attempt(lambda: RunSpec.from_dict(config, source="config.json"), ValueError)
    if err is not None:
        assert one_line(err), repr(str(err))
        assert str(err).startswith("config.json"), str(err)
        return
    assert RunSpec.from_dict(spec.settings()) == spec  # what is accepted round-trips


@FUZZ
@given(command_lines())
def test_any_option_values_give_a_spec_or_a_usage_error(argv):
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        args, usage = attempt(lambda: build_parser().parse_args(argv), SystemExit)
    if usage is not None:
        assert usage.code == 2
        last = stderr.getvalue().strip().splitlines()[-1]
        assert last.startswith("bora-pyro") and ": error: " in last, last
        return
    spec, err = attempt(lambda: _spec_from_args(args), ValueError)
    if err is not None:
        assert one_line(err), repr(str(err))
        return
    assert RunSpec.from_dict(spec.settings()) == spec
