"""Config files fuzzed (hypothesis): TOML text and parsed tables mutated from the shipped
configs (wrong types, huge numbers, NaN and infinities, NULs, unknown keys, missing or
non-table sections). Every one is accepted (and prints as `config check` prints it) or
refused with a ConfigError naming the key, the value and why, on one line: never a
traceback. The files a config names are looked at as `run` would (check_files).

The bulk is marked slow (`make test` runs it); a few hundred run in every `pytest`.
"""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.cli import config_toml
from daemon.config import Config, load, merge, validate
from daemon.configfiles import check_files
from protocol.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {name: (ROOT / "config" / name).read_text(encoding="utf-8")
           for name in ("tapgate.toml", "gate.example.toml")}
PARSED = {name: tomllib.loads(text) for name, text in SHIPPED.items()}
KEYS = sorted({(section, key) for raw in PARSED.values() for section, table in raw.items()
               for key in table})
SECTIONS = sorted({section for raw in PARSED.values() for section in raw})

DICT_EXAMPLES = (8000, 150)  # slow, quick
TEXT_EXAMPLES = (7000, 150)

scalars = st.one_of(
    st.none(),  # the key left out
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, 2**63, -1]),
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("/\0.-_aZ09:\\\"' \n\ud800"), max_size=30),
    st.sampled_from(["", "\0", "var/x\0.db", "/dev/null", "/", ".", "sim", "pcsc",
                     "000000A00001", "000102030405060708090A0B0C0D0E0F", "INFO",
                     "127.0.0.1:9464", "host:0", "https://x/\0"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)
key_names = st.one_of(st.sampled_from([k for _, k in KEYS]), st.text(max_size=12))
section_names = st.one_of(st.sampled_from(SECTIONS), st.text(max_size=10))


@st.composite
def mutated_tables(draw: st.DrawFn) -> dict[str, Any]:
    raw: dict[str, Any] = copy.deepcopy(PARSED[draw(st.sampled_from(sorted(PARSED)))])
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.integers(0, 5))
        if what <= 2:  # a known key given something else (None: left out)
            section, key = draw(st.sampled_from(KEYS))
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                continue
            value = draw(values)
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        elif what == 3:  # any key in any section
            table = raw.setdefault(draw(section_names), {})
            if isinstance(table, dict):
                table[draw(key_names)] = draw(values)
        elif what == 4:  # a section gone
            raw.pop(draw(st.sampled_from(SECTIONS)), None)
        else:  # a section that is no table
            raw[draw(section_names)] = draw(scalars)
    return raw


def accepted_or_refused(make: Any) -> Config | None:
    """``make()``'s config, checked as `config check` checks it; None: refused with a
    ConfigError that names the key, the value and why on one line."""
    try:
        config = make()
        check_files(config)
        config_toml(config)  # what `config check` prints of it
        return config
    except ConfigError as err:
        assert isinstance(err.key, str) and err.key and err.why, repr(err)
        assert "\n" not in str(err), str(err)
        return None


def _tables(raw: dict[str, Any]) -> Config | None:
    return accepted_or_refused(lambda: validate(merge(raw, {}, {})))


@pytest.mark.slow
@settings(max_examples=DICT_EXAMPLES[0], deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_tables())
def test_mutated_tables_are_accepted_or_refused_cleanly(raw: dict[str, Any]) -> None:
    _tables(raw)


@settings(max_examples=DICT_EXAMPLES[1], deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_tables())
def test_mutated_tables_quick(raw: dict[str, Any]) -> None:
    _tables(raw)


TOKENS = ["nan", "inf", "-inf", "+nan", "1e400", "-1e400", "99999999999999999999999",
          "-9223372036854775809", "0x7fffffffffffffff", '"\\u0000"', '"a\\u0000b"',
          "[1, 2]", "{ a = 1 }", "true", '"x"', "''", '"\\ud800"', "1979-05-27", "=", "[",
          "[gate]", "[[gate]]", "[nosuch]", "nosuch = 1", '"""', "\x00", "\ufeff", "#"]


@st.composite
def mutated_text(draw: st.DrawFn) -> str:
    lines = SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))].splitlines()
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(lines) - 1))
        what = draw(st.integers(0, 4))
        line = lines[at]
        if what == 0 and "=" in line:  # a value replaced
            lines[at] = line.partition("=")[0] + "= " + draw(st.sampled_from(TOKENS))
        elif what == 1:
            del lines[at]
            if not lines:
                lines = [""]
        elif what == 2:
            lines.insert(at, draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=30))))
        elif what == 3:  # a few characters in a line changed
            pos = draw(st.integers(0, len(line)))
            cut = draw(st.integers(0, 4))
            lines[at] = line[:pos] + draw(st.text(max_size=4)) + line[pos + cut:]
        else:
            lines.insert(at, line)  # a key twice
    return "\n".join(lines) + "\n"


def _text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
    except UnicodeEncodeError:
        path.write_bytes(text.encode("utf-8", "replace"))
    accepted_or_refused(lambda: load(path, env={}))


@pytest.mark.slow
def test_mutated_toml_text_is_accepted_or_refused_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "tapgate.toml"

    @settings(max_examples=TEXT_EXAMPLES[0], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutated_text())
    def check(text: str) -> None:
        _text(path, text)

    check()


def test_mutated_toml_text_quick(tmp_path: Path) -> None:
    path = tmp_path / "tapgate.toml"

    @settings(max_examples=TEXT_EXAMPLES[1], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutated_text())
    def check(text: str) -> None:
        _text(path, text)

    check()
