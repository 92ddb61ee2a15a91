"""What a newcomer types first: every verb's --help prints its options and exits 0."""

from __future__ import annotations

import pytest

from bora_pyro.cli import build_parser, main

VERBS = sorted(build_parser().parse_args(["diagnose", "x"]).commands)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_a_help(capsys, verb):
    assert main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: bora-pyro " + verb)
    assert "Traceback" not in out


def test_the_top_level_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in VERBS)
    assert len(VERBS) >= 7
