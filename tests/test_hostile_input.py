"""Hostile and mistaken input: every one ends as one line with a hint, never a traceback or a
hang (issue #17)."""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import hvae_core
from hvae_core.cli import cli
from hvae_core.config import resolve_config
from hvae_core.errors import ConfigError, HvaeError
from hvae_core.options import build_section, option

HVAE = [sys.executable, "-m", "hvae_core"]


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result, fragment: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "(hint: " in lines[0], lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def show(tmp_path: Path, text: str | bytes, *args: str):
    path = tmp_path / "config.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return run("config", "show", "--config", str(path), *args)


def alias_bomb(depth: int = 9, width: int = 9) -> str:
    """A list whose last item expands to width**depth values: "billion laughs" in YAML."""
    items = [f"&a0 [{', '.join(['1'] * width)}]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return f"[{', '.join(items)}]"


def console(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real console script, in its own process: what is tested here could hang or fill the
    memory if it regressed, and must not take the test run down with it."""

    def limit_memory() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run(
        [*HVAE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        preexec_fn=limit_memory,
    )


# --- 1. aliases ---------------------------------------------------------------------------


def test_an_alias_bomb_is_one_line_not_a_process_that_grows_until_killed(tmp_path) -> None:
    path = tmp_path / "bomb.yaml"
    # Under a real option: an unknown key would be refused before its value is looked at.
    path.write_text(f"model:\n  z_width: {alias_bomb()}\n")
    done = console("config", "show", "--config", str(path))
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "more than 10,000 values once its aliases are expanded" in line
    assert "(hint: " in line


def test_aliases_that_expand_a_little_still_work(tmp_path) -> None:
    result = show(tmp_path, "model:\n  z_width: &w [2, 4, 4, 8]\n  enc_middle_width: *w\n")
    assert result.exit_code == 0, result.output
    assert "z_width: [2, 4, 4, 8]" in result.stdout
    assert "enc_middle_width: [2, 4, 4, 8]" in result.stdout
    assert "&" not in result.stdout and "*" not in result.stdout  # the shown config is plain


def test_an_alias_to_itself_is_one_line(tmp_path) -> None:
    assert_one_line_error(
        show(tmp_path, "training: &t\n  epochs: *t\n"),
        "training.epochs refers to itself through an alias",
    )
    assert_one_line_error(
        run("config", "show", "--set", "model.z_width=&a [1, *a]"), "refers to itself"
    )


def test_a_bomb_in_a_set_value_is_one_line() -> None:
    bomb = alias_bomb(depth=5)
    assert_one_line_error(run("config", "show", "--set", f"model.z_width={bomb}"), "10,000")


# --- 2. nesting, bytes, files that are not files -------------------------------------------


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path) -> None:
    deep = "[" * 3000 + "]" * 3000
    line = assert_one_line_error(
        show(tmp_path, f"model:\n  z_width: {deep}\n"), "nested more than 32 levels deep"
    )
    assert "line 2" in line
    assert_one_line_error(
        run("config", "show", "--set", f"model.z_width={deep}"), "nested more than 32"
    )
    mapping = "{a: " * 3000 + "1" + "}" * 3000
    assert_one_line_error(run("config", "show", "--set", f"model.z_width={mapping}"), "nested")


def test_aliases_cannot_nest_deeper_than_the_text_does(tmp_path) -> None:
    text = "a0: &a0 " + "[" * 30 + "]" * 30 + "\n"
    text += "".join(f"a{i}: &a{i} {'[' * 30}*a{i - 1}{']' * 30}\n" for i in range(1, 5))
    assert_one_line_error(show(tmp_path, text), "nested more than 32 levels deep")


def test_a_binary_config_file_is_one_line(tmp_path) -> None:
    assert_one_line_error(
        show(tmp_path, bytes(range(128, 256)) * 4), "is not UTF-8 text (byte 1 is 0x80)"
    )
    assert_one_line_error(show(tmp_path, b"model: \x00\x01"), "special characters are not allowed")


def test_a_utf8_byte_order_mark_is_fine(tmp_path) -> None:
    result = show(tmp_path, "\ufefftraining: {epochs: 3}\n".encode())
    assert result.exit_code == 0, result.output
    assert "  epochs: 3\n" in result.stdout


def test_a_config_that_is_not_a_regular_file_is_one_line(tmp_path) -> None:
    assert_one_line_error(
        run("config", "show", "--config", os.devnull), "/dev/null is not a regular file"
    )
    assert_one_line_error(run("config", "show", "--config", str(tmp_path)), "is a folder")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    assert_one_line_error(run("config", "show", "--config", str(big)), "a config is a few")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_config_is_refused_without_waiting_for_a_writer(tmp_path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    done = console("config", "show", "--config", str(fifo))
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert f"error: config file {fifo} is not a regular file" in line


# --- 3. duplicate keys -----------------------------------------------------------------------


def test_a_key_given_twice_in_a_file_is_an_error_naming_it(tmp_path) -> None:
    line = assert_one_line_error(
        show(tmp_path, "training:\n  epochs: 1\n  batch_size: 8\n  epochs: 2\n"),
        "key training.epochs is given twice (lines 2 and 4)",
    )
    assert "keep one" in line
    assert_one_line_error(
        show(tmp_path, "training: {epochs: 1}\nmodel: {}\ntraining: {epochs: 2}\n"),
        "section 'training' is given twice (lines 1 and 3)",
    )
    # Keys YAML reads as equal are one key, however they are spelt.
    assert_one_line_error(
        show(tmp_path, "tracker:\n  tb:\n    1: a\n    0x1: b\n"), "tracker.tb.1 is given twice"
    )


def test_a_key_given_twice_in_a_set_value_is_an_error_naming_it() -> None:
    assert_one_line_error(
        run("config", "show", "--set", "tracker.tensorboard={images: true, images: false}"),
        "key tracker.tensorboard.images is given twice (line 1, columns 2 and 16)",
    )


def test_a_merge_key_may_still_be_overridden(tmp_path) -> None:
    result = show(tmp_path, "training:\n  <<: {epochs: 3, batch_size: 8}\n  epochs: 4\n")
    assert result.exit_code == 0, result.output
    assert "  epochs: 4\n" in result.stdout and "  batch_size: 8\n" in result.stdout


# --- 4. numbers that make no sense ----------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("training.learning_rate=.nan", "training.learning_rate: expected a number, got nan"),
        ("training.learning_rate=.inf", "got inf (NaN and infinity are not allowed here)"),
        ("training.beta=-.inf", "training.beta: expected a number, got -inf"),
        ("training.learning_rate=nan", "got 'nan' (NaN and infinity"),
        ("training.learning_rate=1e999", "got '1e999' (NaN and infinity"),
        ("training.learning_rate=" + "9" * 400, "(too large for a 64-bit float)"),
        ("training.epochs=" + "9" * 40, "training.epochs: expected an integer"),
        ("model.gradient_smoothing=.nan", "model.gradient_smoothing: expected a number"),
        ("training.seed=-1", "training.seed: expected 0 to 2**32 - 1 (4294967295), got -1"),
        ("training.seed=4294967296", "got 4294967296"),
        ("model.z_width=[1, .nan]", "model.z_width: expected"),
    ],
)
def test_non_finite_huge_and_out_of_range_numbers_are_one_line(setting, fragment) -> None:
    assert_one_line_error(run("config", "show", "--set", setting), fragment)


def test_seed_flag_takes_the_whole_unsigned_32_bit_range() -> None:
    assert_one_line_error(run("config", "show", "--seed", "-1"), "training.seed: expected 0")
    assert_one_line_error(run("config", "show", "--seed", str(2**32)), "training.seed")
    assert resolve_config(flags={"seed": 2**32 - 1}).training.seed == 2**32 - 1


def test_an_option_may_allow_infinity_explicitly() -> None:
    @dataclass
    class Options:
        limit: float = option(float("inf"), "stop at this value (inf: never)", allow_nonfinite=True)
        rate: float = option(1.0, "a rate")

    assert build_section(Options, {}, "x", None).limit == float("inf")
    assert build_section(Options, {"limit": "-inf"}, "x", None).limit == float("-inf")
    with pytest.raises(ConfigError, match="x.rate: expected a number, got inf"):
        build_section(Options, {"rate": float("inf")}, "x", None)


@pytest.mark.parametrize(
    ("args", "fragment", "code"),
    [
        (["--temperature", "nan"], "--temperature 'nan': temperatures must be finite", 1),
        (["--temperature", "1,inf"], "--temperature '1,inf'", 1),
        (["--temperature", "-1"], "must be finite numbers >= 0", 1),
        (["--output-temperature", "nan"], "'nan' is not a finite number", 2),
        (["--output-temperature", "inf"], "'inf' is not a finite number", 2),
        (["--seed", "-1"], "-1 is not in the range 0<=x<=4294967295", 2),
        (["--seed", str(2**32)], "4294967296 is not in the range", 2),
    ],
)
def test_sample_refuses_nan_temperatures_and_bad_seeds(tmp_path, args, fragment, code) -> None:
    # Checked before the run is opened: an empty folder would be "not a run directory".
    assert_one_line_error(run("sample", str(tmp_path), *args), fragment, code)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seed", "-1"], "-1 is not in the range 0<=x<=4294967295"),
        (["--output-temperature", "nan"], "'nan' is not a finite number"),
    ],
)
def test_export_refuses_bad_seeds_and_temperatures(tmp_path, args, fragment) -> None:
    assert_one_line_error(
        run("export", str(tmp_path), "--out", str(tmp_path / "x"), *args), fragment
    )


# --- 6. every user error has a hint ----------------------------------------------------------

USER_ERRORS = {"ConfigError", "HvaeError", "PluginError", "InputError"}
CHECKED_FILES = ("config.py", "cli.py", "options.py", "strict_yaml.py")


@pytest.mark.parametrize("name", CHECKED_FILES)
def test_every_user_error_in_the_config_and_the_cli_has_a_hint(name) -> None:
    path = Path(hvae_core.__file__).parent / name
    tree = ast.parse(path.read_text(encoding="utf-8"))
    missing = [
        f"{name}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) in USER_ERRORS
        and not any(k.arg == "hint" for k in node.keywords)
    ]
    assert not missing, f"errors without a hint: {', '.join(missing)}"


# --- 5. fuzzing -------------------------------------------------------------------------------


class Fuzzer:
    """Bad (and some good) config files and --set values, from a seeded random source."""

    SCALARS = [
        "0", "-1", "1", "7", "2", "3", "-0", "0x10", "1_000", "4294967296", "-4294967297",
        "9" * 30, "9" * 400, "1e999", "-1e999", "1e-320", ".nan", ".NaN", ".inf", "-.inf",
        "nan", "inf", "0.5", "-0.5", "1e-4", "true", "false", "yes", "no", "on", "null", "~",
        "''", '""', "none", "x", "'1'", "2001-12-14", "!!binary aGk=", "!!str 3", "!!float 3",
        "!!python/object:os.system {}", "'a: b'", "' '", "\"\\t\"", "😀", "ünïcødé", "silu",
        "vdvae", "depthwise", "cosd", "constant", "tensorboard", "digits", "[]", "{}",
    ]  # fmt: skip
    TOP_KEYS = ["a", "", "1", "null", "~", "x.y", "mödel", "training ", "<<"]

    def __init__(self, seed: int, defaults: dict[str, dict[str, Any]]) -> None:
        self.rng = random.Random(seed)
        self.defaults = defaults
        self.keys = {section: list(options) for section, options in defaults.items()}
        self.keys["tracker"] = ["images", "nope"]

    def string(self) -> str:
        rng = self.rng
        pick = rng.randrange(5)
        if pick == 0:
            return "x" * rng.choice([1, 100, 10_000, 200_000])
        if pick == 1:
            chars = [chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 20))]
            return '"' + "".join(chars).replace("\\", "\\\\").replace('"', '\\"') + '"'
        if pick == 2:
            return "'" + "".join(rng.choice("ab:#[]{},&*!|>%@` -") for _ in range(8)) + "'"
        return rng.choice(self.SCALARS)

    def good(self, section: str, name: str) -> str | None:
        """The option's default, as YAML (or None for a key that is not an option)."""
        if name not in self.defaults.get(section, {}):
            return None
        return json.dumps(self.defaults[section][name])

    def value(self, depth: int = 0) -> str:
        rng = self.rng
        pick = rng.randrange(10)
        # Nesting comes from pick 7; random lists stay shallow, so that they stay small.
        if pick < 4 or depth > 1:
            return self.string() if pick == 0 else rng.choice(self.SCALARS)
        if pick == 7 and rng.random() < 0.2:
            return "[" * (depth + 30) + "1" + "]" * (depth + 30)
        if pick <= 7:
            items = [self.value(depth + 1) for _ in range(rng.choice([0, 1, 2, 4, 9]))]
            return "[" + ", ".join(items) + "]"
        if pick == 8:
            keys = [rng.choice(["a", "b", "images", "1"]) for _ in range(rng.randrange(1, 4))]
            return "{" + ", ".join(f"{k}: {self.value(depth + 1)}" for k in keys) + "}"
        return "&v [" + ", ".join(["*v"] * rng.randrange(1, 3)) + "]"

    def key(self) -> tuple[str, str]:
        rng = self.rng
        section = rng.choice([*self.keys, rng.choice(self.TOP_KEYS)])
        names = self.keys.get(section) or ["x"]
        return section, rng.choice([*names, *names, rng.choice(self.TOP_KEYS)])

    def override(self) -> str:
        rng = self.rng
        section, name = self.key()
        if rng.random() < 0.1:
            return rng.choice(["", "=", "model", "model.=1", ".z_width=1", "a.b.c.d=1", "x=y"])
        if section == "tracker":
            section = f"tracker.{rng.choice(['tensorboard', 'nope'])}"
        value = self.value() if rng.random() < 0.7 else ""
        if rng.random() < 0.3:
            value = self.good(section, name) or value
        return f"{section}.{name}={value}"

    def file(self) -> str | bytes:
        rng = self.rng
        pick = rng.randrange(12)
        if pick == 0:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        if pick == 1:
            return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(1, 100)))
        if pick == 2:
            section, name = rng.choice([("model", "z_width"), ("training", "epochs")])
            return (
                f"{section}:\n  {name}: {alias_bomb(rng.randrange(2, 10), rng.randrange(2, 10))}\n"
            )
        if pick == 3:
            return rng.choice(["", "~", "[]", "1", "- a", "---\n---\n", "{", "a: b: c", "\t"])
        lines = []
        if pick in (6, 7):  # a good config: real options, each at its default
            for section in rng.sample(list(self.defaults), 3):
                lines.append(f"{section}:")
                for name in rng.sample(self.keys[section], min(3, len(self.keys[section]))):
                    lines.append(f"  {name}: {self.good(section, name)}")
            return "\n".join(lines) + "\n"
        for _ in range(rng.randrange(1, 5)):
            section, _ = self.key()
            lines.append(f"{section}:")
            for _ in range(rng.randrange(0, 5)):
                _, name = self.key()
                if self.keys.get(section):
                    name = rng.choice(self.keys[section])
                value = self.value()
                if rng.random() < 0.3:
                    value = self.good(section, name) or value
                lines.append(f"  {name}: {value}")
        if pick == 4 and len(lines) > 1:  # a key given twice
            lines.append(lines[-1])
        if pick == 5:  # an alias defined in one option and used in another
            lines += [
                "model:",
                "  z_width: &w [2, 4, 4, 8]",
                f"  {rng.choice(self.keys['model'])}: *w",
            ]
        return "\n".join(lines) + "\n"


def check_resolves_or_fails_in_one_line(path: Path | None, overrides: list[str], out: Path) -> bool:
    """True when accepted (and then the shown YAML must resolve to the same config)."""
    try:
        cfg = resolve_config(None if path is None else str(path), None, overrides)
    except HvaeError as exc:
        line = exc.one_line()
        assert line and "\n" not in line and len(line) < 2000, line
        assert exc.hint, f"no hint: {line}"
        return False
    out.write_text(cfg.to_yaml(), encoding="utf-8")
    assert resolve_config(str(out)).to_dict() == cfg.to_dict()
    return True


def test_fuzzed_configs_and_set_values_are_accepted_and_round_trip_or_fail_in_one_line(
    tmp_path,
) -> None:
    fuzz = Fuzzer(17, resolve_config().to_dict())
    path, shown = tmp_path / "fuzz.yaml", tmp_path / "shown.yaml"
    accepted = 0
    for case in range(400):
        overrides = [fuzz.override() for _ in range(fuzz.rng.choice([0, 0, 1, 1, 2]))]
        config = None
        if case % 2 == 0 or not overrides:
            text = fuzz.file()
            if isinstance(text, bytes):
                path.write_bytes(text)
            else:
                path.write_text(text, encoding="utf-8")
            config = path
        try:
            accepted += check_resolves_or_fails_in_one_line(config, overrides, shown)
        except AssertionError as exc:
            raise AssertionError(
                f"case {case}: {config and config.read_bytes()[:500]!r} "
                f"{[o[:200] for o in overrides]}: {exc}"
            ) from None
        if case % 20 == 0:  # and through the CLI itself, now and then
            args = ["config", "show", *(["--config", str(config)] if config else [])]
            result = run(*args, *(a for o in overrides for a in ("--set", o)))
            assert result.exit_code in (0, 2), result.output
            assert "Traceback" not in result.output
            if result.exit_code:
                assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert accepted >= 30  # the generator also makes good configs, so both paths are tested
