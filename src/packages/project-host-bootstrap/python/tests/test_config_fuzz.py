"""Differential fuzzing with hypothesis: the same generated config texts go to
the shipped bootstrap.py (check-config's own functions: parse_config_text,
Config.from_dict, to_dict) and to zod (scripts/zod-check-config.ts, one
long-running node process), which must agree on the verdict, the error paths
and the parsed config; bootstrap.py must answer every text with a verdict
(ConfigError, exit 2) or a config, never an internal error.

test/config-fuzz.test.ts does the same from the TypeScript side with
fast-check; this one generates differently (hypothesis's unicode text,
surrogates included, JSON texts with huge integers and non-JSON constants).

Bounded for CI: FUZZ_EXAMPLES (default 1000) examples; the seed is printed on
failure (replay with FUZZ_SEED=<seed>); `pnpm fuzz` runs a long one."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

PACKAGE = Path(__file__).resolve().parents[2]
TSX = PACKAGE.parents[2] / "node_modules" / ".bin" / "tsx"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
SEED = int(os.environ["FUZZ_SEED"]) if "FUZZ_SEED" in os.environ else random.SystemRandom().randrange(2**32)

VALID = [
    json.loads(p.read_text(encoding="utf-8"))["config"]
    for p in sorted((PACKAGE / "fixtures" / "configs" / "valid").glob("*.json"))
]


class Zod:
    """checkConfig in a long-running node process: one JSON text in, one verdict out."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [str(TSX), "scripts/zod-check-config.ts"],
            cwd=PACKAGE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )

    def check(self, text: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zod process ended (exit {self.proc.poll()})")
        verdict: dict[str, Any] = json.loads(line)
        return verdict

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zod() -> Iterator[Zod]:
    if shutil.which("node") is None or not TSX.exists():
        pytest.skip(f"node or {TSX} is missing (run scripts/setup.sh); the zod side cannot run")
    server = Zod()
    yield server
    server.close()


def python_verdict(text: str) -> dict[str, Any]:
    """What check-config --json says, reduced to verdict, sorted paths and config."""
    try:
        config = bootstrap.Config.from_dict(bootstrap.parse_config_text(text, "fuzz"), "fuzz")
    except bootstrap.ConfigError as e:
        json.dumps([bootstrap.issue_json(i) for i in e.issues], allow_nan=False)  # printable as strict JSON
        e.message.encode("utf-8", "backslashreplace")  # printable on stderr
        return {"ok": False, "paths": sorted({i.json_path() for i in e.issues})}
    return {"ok": True, "config": json.loads(json.dumps(config.to_dict(), allow_nan=False))}


# --- strategies ----------------------------------------------------------------------

# Every code point, surrogates included (hypothesis leaves those out by default), weighted to the interesting ones.
any_char = st.characters(exclude_categories=())
nasty_char = st.sampled_from(
    list("\0\t\n\r\x1b\x7f\x80\x85\x9f\xa0\u2028\u2029\ufeff\ud800\udfff/.%@:[]\\-+=#?'\"$` ñü")
)
text = st.text(st.one_of(nasty_char, any_char, st.sampled_from("abcxyz019AZ")), max_size=10)

label = st.one_of(
    st.sampled_from(
        ["a", "hub", "example", "com", "xn--ida", "xn--bcher-kva", "-a", "a-", "0", "010", "0x7f", "ñ", "a_b"]
    ),
    st.from_regex(r"[a-z0-9-]{1,6}", fullmatch=True),
)
host = st.one_of(
    st.lists(label, min_size=1, max_size=4).map(".".join),
    st.lists(st.integers(0, 300).map(str), min_size=1, max_size=5).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.lists(st.from_regex(r"[0-9a-f]{0,5}|[0-9.]{1,15}", fullmatch=True), max_size=9).map(
        lambda gs: "[" + ":".join(gs) + "]"
    ),
    text,
)
url = st.builds(
    lambda scheme, user, h, port, rest: f"{scheme}{user}{h}{port}{rest}",
    st.sampled_from(["http://", "https://", "HTTP://", "http:", "ftp://", "http:\\\\", ""]),
    st.sampled_from(["", "", "", "u@", "u:p@"]),
    host,
    st.one_of(st.just(""), st.integers(0, 70000).map(lambda p: f":{p}"), st.sampled_from([":", ":08", ":x"])),
    st.one_of(st.just(""), text.map(lambda t: "/" + t), st.sampled_from(["/a?b#c", "/%41", "/%4", "/a b", "?#"])),
)
path_pool = ["/", "/home", "/home/ubuntu", "/home/ubuntu/cocalc-host", "/home/ubuntu/cocalc-host/bootstrap", "/btrfs"]
abs_path = st.one_of(
    st.sampled_from([*path_pool, "/srv/x", "/etc/x", "/usr/local", "/var/lib", "/dev/sda", "/root"]),
    st.builds(
        lambda p, segs: (p.rstrip("/") + "/" + "/".join(segs)) if segs else p,
        st.sampled_from(path_pool),
        st.lists(st.one_of(st.sampled_from(["a", ".", "..", "", "btrfs.img", "x"]), text), max_size=3),
    ),
)
# Integers as raw JSON text (a 5000-digit one is refused by json.dumps, not by the validators).
big_int_text = st.sampled_from(["1" * 5000, "-" + "9" * 400, "1" + "0" * 308, "9007199254740993", "-0", "1e400", "1.0"])
non_json = st.sampled_from(["NaN", "Infinity", "-Infinity"])
scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), text)
json_value = st.recursive(
    scalar, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)), max_leaves=6
)
deep = st.integers(0, 40).map(lambda n: _nest(n))
field_value = st.one_of(url, abs_path, host, json_value, deep, st.lists(st.one_of(url, abs_path, text), max_size=9))


rel_path = st.lists(st.one_of(st.sampled_from(["bin", "a", ".", "..", ""]), text), min_size=1, max_size=3).map("/".join)
package = st.one_of(
    st.builds(
        str.__add__,
        st.from_regex(r"[a-z0-9][a-z0-9.+-]{0,6}", fullmatch=True),
        st.sampled_from(["", "-", "+", "=1.0", "/noble", ":amd64", ".", "--"]),
    ),
    st.sampled_from(["g++", "git-", "a-", "-a", "a", "Git"]),
)
unit = st.one_of(st.from_regex(r"cocalc-[a-z@.-]{0,6}", fullmatch=True), st.sampled_from(["ssh", "cocalc-"]), text)


def grammar_for(path: tuple[Any, ...]) -> st.SearchStrategy[Any] | None:
    """The grammar of a field's own kind of value (mixed with the generic one where it is used)."""
    names = [p for p in path if isinstance(p, str)]
    name, item = (names[-1] if names else ""), isinstance(path[-1], int)
    parent = path[-2] if len(path) > 1 else ""
    if name.endswith("url") or name == "conat_urls":
        return url if item else st.lists(url, max_size=9)
    if name in ("home", "bootstrap_root", "bootstrap_dir", "mount_point", "image_path"):
        return abs_path
    if name == "candidates":
        return abs_path if item else st.lists(abs_path, max_size=17)
    if name in ("expected_files", "executables", "exec"):
        return rel_path if item or name == "exec" else st.lists(rel_path, max_size=65)
    if name == "packages":
        return package if item else st.lists(package, max_size=12)
    if name == "unit":
        return unit
    if name == "host" and parent == "tunnel":
        return host
    if parent == "env":
        return text
    return None


def _nest(n: int) -> Any:
    value: Any = "x"
    for i in range(n):
        value = [value] if i % 2 else {"k": value}
    return value


def _paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in [(*at, k), *_paths(v, (*at, k))]]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in [(*at, i), *_paths(v, (*at, i))]]
    return []


SCHEMA_PATHS = sorted({p for config in VALID for p in _paths(config)}, key=repr)
RAW = "@@raw@@"


GRAMMAR_PATHS = [p for p in SCHEMA_PATHS if grammar_for(p) is not None]


@st.composite
def config_texts(draw: st.DrawFn) -> str:
    """A valid vector with 0-4 edits, serialised; some values are raw JSON text (huge numbers, NaN)."""
    config = copy.deepcopy(draw(st.sampled_from(VALID)))
    raws: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.one_of(st.sampled_from(GRAMMAR_PATHS), st.sampled_from(SCHEMA_PATHS)))
        parent: Any = config
        for part in path[:-1]:
            if (isinstance(parent, dict) and part in parent) or (
                isinstance(parent, list) and isinstance(part, int) and part < len(parent)
            ):
                parent = parent[part]
            else:
                parent = None
                break
        last = path[-1]
        fits_dict = isinstance(parent, dict) and isinstance(last, str)
        fits_list = isinstance(parent, list) and isinstance(last, int) and last < len(parent)
        if not (fits_dict or fits_list):
            continue
        kind = draw(st.sampled_from(["set", "set", "set", "raw", "drop", "add"]))
        if kind == "drop":
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                del parent[path[-1]]
        elif kind == "add" and isinstance(parent, dict):
            parent[draw(text)] = draw(json_value)
        elif kind == "raw":
            raws.append(draw(st.one_of(big_int_text, non_json)))
            parent[path[-1]] = RAW
        else:
            own = grammar_for(path)
            parent[path[-1]] = draw(st.one_of(own, own, own, field_value) if own is not None else field_value)
    text_out = json.dumps(config)  # ASCII: surrogates and separators escaped, as JSON.stringify would too
    for raw in raws:
        text_out = text_out.replace(json.dumps(RAW), raw, 1)
    return text_out


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@seed(SEED)
@given(config_texts())
def test_bootstrap_py_and_zod_agree_on_generated_configs(zod: Zod, config_text: str) -> None:
    note(f"config fuzz (hypothesis): FUZZ_SEED={SEED} FUZZ_EXAMPLES={EXAMPLES}")
    assert python_verdict(config_text) == zod.check(config_text), f"replay with FUZZ_SEED={SEED}"


@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True)
@seed(SEED)
@given(url)
def test_the_url_rule_is_the_same_on_both_sides(zod: Zod, candidate: str) -> None:
    note(f"config fuzz (hypothesis): FUZZ_SEED={SEED} FUZZ_EXAMPLES={EXAMPLES}")
    config = copy.deepcopy(VALID[0])
    config["hub"]["url"] = candidate
    text_in = json.dumps(config)
    expected = zod.check(text_in)
    assert python_verdict(text_in) == expected, f"{candidate!r}; replay with FUZZ_SEED={SEED}"
    assert bootstrap.is_http_url(candidate) is expected["ok"]
