"""Flags generated from a config dataclass (saicl.config_cli): types, None, comma lists, choices, errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from saicl.config_cli import ConfigError, check_at_least, check_choices, cli_message, config_overrides, make_parser


@dataclass
class Demo:
    out: str = field(default="here", metadata={"help": "folder"})
    steps: int | None = field(default=10, metadata={"help": "steps"})
    rate: float = 0.5
    train: bool = True
    ks: tuple[int, ...] = field(default=(2, 4), metadata={"help": "demonstration counts"})
    names: tuple[str, ...] = field(default=("a",), metadata={"choices": ("a", "b")})

    def __post_init__(self):
        check_choices(self)
        check_at_least(self, 1, ("steps", "ks"))


def parse(*argv: str) -> Demo:
    args = make_parser("demo", Demo, "a demo").parse_args(list(argv))
    return Demo(**config_overrides(args, Demo))


def test_defaults_come_from_the_dataclass_and_flags_override_them():
    assert parse() == Demo()
    got = parse("--out", "x", "--steps", "none", "--rate", "2e-3", "--no-train", "--ks", "4,16", "--names", "b,a")
    assert got == Demo(out="x", steps=None, rate=2e-3, train=False, ks=(4, 16), names=("b", "a"))


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        make_parser("demo", Demo, "a demo").parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: 2,4)" in text and "(default: 10)" in text and "--no-train" in text


@pytest.mark.parametrize("argv, flag", [
    (("--ks", "4,x"), "--ks 4,x"),
    (("--ks", "0,4"), "--ks 0,4"),
    (("--steps", "0"), "--steps 0"),
    (("--names", "c"), "--names c"),
    (("--rate", "fast"), "--rate fast"),
])
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError) as err:
        parse(*argv)
    assert cli_message(err.value).startswith(flag)
    assert str(err.value).startswith(err.value.field + "=")
