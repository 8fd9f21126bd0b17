"""Config validation: the shared vectors in fixtures/configs/ through
Config.from_dict, the to_dict round trip, and the CLI's behaviour on a bad
config (exit 2, every error listed with its path and value, nothing written).

test/conformance.test.ts runs the same vectors through zod and compares."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from bootstrap import ArtifactSpec, Config, ConfigError, TunnelSpec

PACKAGE = Path(__file__).resolve().parents[2]
BOOTSTRAP_PY = PACKAGE / "python" / "bootstrap.py"
FIXTURES = PACKAGE / "fixtures" / "configs"


def load_vectors(kind: str) -> list[Any]:
    return [
        pytest.param(json.loads(path.read_text(encoding="utf-8")), id=f"{kind}/{path.stem}")
        for path in sorted((FIXTURES / kind).glob("*.json"))
    ]


VALID = load_vectors("valid")
INVALID = load_vectors("invalid")


def error_paths(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(data)
    return sorted({issue.json_path() for issue in caught.value.issues})


def minimal_config() -> dict[str, Any]:
    vector = json.loads((FIXTURES / "valid" / "minimal-defaults.json").read_text(encoding="utf-8"))
    config = vector["config"]
    assert isinstance(config, dict)
    return config


# --- the vectors ---------------------------------------------------------------


def test_there_are_enough_vectors() -> None:
    assert len(VALID) + len(INVALID) >= 30
    assert len(VALID) >= 5


@pytest.mark.parametrize("vector", INVALID)
def test_invalid_vector_reports_exactly_the_recorded_paths(vector: dict[str, Any]) -> None:
    assert error_paths(vector["config"]) == vector["errors"]


@pytest.mark.parametrize("vector", VALID)
def test_valid_vector_parses_to_the_recorded_output(vector: dict[str, Any]) -> None:
    config = Config.from_dict(vector["config"])
    assert config.to_dict() == vector["output"]


@pytest.mark.parametrize("vector", VALID)
def test_to_dict_round_trips(vector: dict[str, Any]) -> None:
    config = Config.from_dict(vector["config"])
    again = Config.from_dict(config.to_dict())
    assert again == config
    assert again.to_dict() == config.to_dict()
    # to_dict is plain JSON (lists, dicts), so it serialises as the hub would.
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


def test_from_dict_does_not_mutate_its_input() -> None:
    data = minimal_config()
    before = copy.deepcopy(data)
    Config.from_dict(data)
    assert data == before


# --- semantics worth pinning down beyond the vectors -------------------------------


def test_issues_carry_the_offending_value() -> None:
    data = minimal_config()
    data["arch"] = "x86_64"
    data["artifacts"]["tools"]["sha256"] = "ABC"
    del data["host"]["name"]
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(data, "host.json")
    by_path = {issue.json_path(): issue for issue in caught.value.issues}
    assert by_path["$.arch"].value == "x86_64"
    assert by_path["$.artifacts.tools.sha256"].value == "ABC"
    assert by_path["$.host.name"].value is bootstrap.MISSING
    text = caught.value.message
    assert text.startswith("host.json: 3 problem(s)")
    assert '$.arch: must be one of amd64, arm64 (got "x86_64")' in text
    assert "$.host.name: is required (got nothing)" in text
    assert caught.value.exit_code == 2


def test_integral_float_becomes_int_and_bool_is_not_int() -> None:
    data = minimal_config()
    data["apt"]["lock_timeout_s"] = 30.0
    config = Config.from_dict(data)
    assert config.apt.lock_timeout_s == 30
    assert type(config.apt.lock_timeout_s) is int
    data["apt"]["lock_timeout_s"] = True
    assert error_paths(data) == ["$.apt.lock_timeout_s"]


def test_nested_from_dict_reports_paths_relative_to_the_section() -> None:
    artifact = ArtifactSpec.from_dict({"url": "https://example.com/a.tar.xz", "version": "1"})
    assert artifact.expected_files == ()
    assert artifact.sha256 is None
    with pytest.raises(ConfigError) as caught:
        TunnelSpec.from_dict({"host": "x", "user": "U", "remote_port": 0, "local_port": 1, "extra": 1})
    assert sorted(i.json_path() for i in caught.value.issues) == ["$", "$.remote_port", "$.user"]


def test_config_is_frozen_all_the_way_down() -> None:
    data = minimal_config()
    data["env"] = {"A": "b"}
    config = Config.from_dict(data)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.arch = "arm64"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.env["A"] = "c"  # type: ignore[index]
    assert isinstance(config.conat_urls, tuple)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # Verdicts of config.ts's isHttpUrl under Node 20, recorded by hand.
        ("https://hub.example.com/x?y#z", True),
        ("http://EXAMPLE.com", True),
        ("http://[::1]:80/", True),
        ("http://999", True),  # an IPv4 address as one number
        ("http://0x7f.1", True),
        ("http://ñ.com", True),
        ("http://x:", True),  # empty port
        ("http://x.", True),
        ("https://a.b/c%20d", True),  # escapes are fine outside the authority
        # WHATWG URL accepts these, the plain-form rule does not (urllib could not fetch them as written).
        ("HTTP://EXAMPLE.com", False),
        ("http://@x", False),
        ("http:x", False),
        ("http:\\\\x\\y", False),
        ("http://%41", False),
        ("\x01http://x", False),
        # WHATWG URL refuses these.
        ("http://", False),
        ("http://x:99999", False),
        ("http://x:8a", False),
        ("http://1.2.3.256", False),
        ("http://foo.1", False),
        ("http://09.1.1.1", False),
        ("http://[::1", False),
        ("http://a<b", False),
        ("http://a%2fb", False),
        # No userinfo, no other scheme, no whitespace (JavaScript's \s) anywhere.
        ("http://u@x", False),
        ("http://u:p@x", False),
        ("ftp://x", False),
        ("ws://x", False),
        ("/relative", False),
        ("http://x#a b", False),
        ("http://x\u00a0y", False),
        ("http://x/\ufeff", False),
    ],
)
def test_is_http_url_matches_config_ts(url: str, expected: bool) -> None:
    assert bootstrap.is_http_url(url) is expected


@pytest.mark.parametrize(
    ("path", "absolute", "relative"),
    [
        ("/", True, False),
        ("/a/b", True, False),
        ("a/b", False, True),
        ("a/../b", False, False),
        ("/a/./b", False, False),
        ("/a//b", False, False),
        ("/a/", False, False),
        ("a/", False, False),
        ("a\0b", False, False),
        ("...", False, True),  # only . and .. are special
    ],
)
def test_path_rules(path: str, absolute: bool, relative: bool) -> None:
    assert bootstrap.is_abs_path(path) is absolute
    assert bootstrap.is_rel_path(path) is relative


# --- the CLI on a bad config: exit 2, every error, nothing written ---------------


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its mode, size and mtime."""
    result: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = full.lstat()
            result[str(full.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return result


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}
    return subprocess.run(
        [sys.executable, str(BOOTSTRAP_PY), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture
def host_dirs(tmp_path: Path) -> Path:
    """A home with an existing bootstrap dir, as the stub leaves it."""
    bootstrap_dir = tmp_path / "home" / "cocalc-host" / "bootstrap"
    bootstrap_dir.mkdir(parents=True)
    (bootstrap_dir / "bootstrap.log").write_text("stub output\n")
    return tmp_path


def bad_config(root: Path) -> tuple[dict[str, Any], list[str]]:
    """Paths inside root, and four problems (one of them absent, one an unknown key)."""
    data = minimal_config()
    home = root / "home"
    data.update(
        home=str(home), bootstrap_root=str(home / "cocalc-host"), bootstrap_dir=str(home / "cocalc-host" / "bootstrap")
    )
    data["btrfs"]["image_path"] = str(home / "cocalc-host" / "btrfs.img")
    data["artifacts"]["project"]["sha256"] = "F" * 64
    data["apt"]["lock_timeout_s"] = -1
    del data["service"]["exec"]
    data["tunnel"] = {"host": "ssh.example.com", "user": "t", "remote_port": 1, "local_port": 2, "secret": "x"}
    return data, ["$.apt.lock_timeout_s", "$.artifacts.project.sha256", "$.service.exec", "$.tunnel"]


@pytest.mark.parametrize("command", [[], ["run"], ["check-config"]], ids=["default", "run", "check-config"])
def test_invalid_config_exits_2_lists_every_error_and_writes_nothing(host_dirs: Path, command: list[str]) -> None:
    data, expected_paths = bad_config(host_dirs)
    config_path = host_dirs / "home" / "cocalc-host" / "bootstrap" / "bootstrap-config.json"
    config_path.write_text(json.dumps(data))
    before = snapshot(host_dirs)

    result = run_cli("--config", str(config_path), *command, home=host_dirs / "home")

    assert result.returncode == 2, result.stderr
    error_lines = [line.strip() for line in result.stderr.splitlines() if line.startswith("  $")]
    assert sorted(line.split(":")[0] for line in error_lines) == expected_paths
    assert any(line.startswith("$.apt.lock_timeout_s:") and line.endswith("(got -1)") for line in error_lines)
    assert any(line.startswith("$.artifacts.project.sha256:") and f'(got "{"F" * 64}")' in line for line in error_lines)
    assert any(line.startswith("$.service.exec:") and line.endswith("(got nothing)") for line in error_lines)
    assert "nothing was changed" in result.stderr
    assert snapshot(host_dirs) == before


def test_check_config_json_lists_every_error(host_dirs: Path) -> None:
    data, expected_paths = bad_config(host_dirs)
    config_path = host_dirs / "config.json"
    config_path.write_text(json.dumps(data))
    result = run_cli("--json", "--config", str(config_path), "check-config", home=host_dirs / "home")
    assert result.returncode == 2
    verdict = json.loads(result.stdout)
    assert verdict["ok"] is False
    assert sorted(e["path"] for e in verdict["errors"]) == expected_paths
    by_path = {e["path"]: e for e in verdict["errors"]}
    assert by_path["$.apt.lock_timeout_s"]["value"] == -1
    assert "value" not in by_path["$.service.exec"]  # absent, not null
    assert by_path["$.tunnel"]["value"] == ["secret"]


def test_check_config_accepts_a_valid_config(tmp_path: Path) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(minimal_config()))
    result = run_cli("--config", str(config_path), "check-config", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid (schema_version 1, host host-1)" in result.stdout
    as_json = run_cli("--json", "--config", str(config_path), "check-config", home=tmp_path)
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == {"ok": True, "config": Config.from_dict(minimal_config()).to_dict()}


@pytest.mark.parametrize(
    ("content", "problem"),
    [("{not json", "not valid JSON"), (None, "config file not found")],
    ids=["bad-json", "missing-file"],
)
def test_unreadable_config_exits_2(tmp_path: Path, content: str | None, problem: str) -> None:
    config_path = tmp_path / "config.json"
    if content is not None:
        config_path.write_text(content)
    result = run_cli("--config", str(config_path), "check-config", home=tmp_path)
    assert result.returncode == 2
    assert problem in result.stderr


# --- one declaration per field: the validator is derived from it ---------------


def test_schema_version_literal_is_the_shipped_schema_version() -> None:
    hints = typing.get_type_hints(Config, include_extras=True)
    assert typing.get_args(hints["schema_version"]) == (bootstrap.SCHEMA_VERSION,)


def test_defaults_of_the_dataclasses_are_the_schema_defaults() -> None:
    """A field's dataclass default is what a missing key becomes (one declaration, not two)."""
    artifact = ArtifactSpec(url="https://example.com/a.tar.xz", version="1")
    assert artifact == ArtifactSpec.from_dict({"url": "https://example.com/a.tar.xz", "version": "1"})
    assert artifact.strip_components == 0 and artifact.expected_files == ()


def test_a_declaration_the_rules_cannot_read_is_refused() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NoRange(bootstrap.ConfigSpec):
        n: int  # an int must declare its Range

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class NoItems(bootstrap.ConfigSpec):
        xs: tuple[str, ...]  # an array must declare its Items

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Unknown(bootstrap.ConfigSpec):
        f: float  # no zod twin

    for spec, problem in ((NoRange, "exactly one Range"), (NoItems, "exactly one Items"), (Unknown, "no validator")):
        with pytest.raises(TypeError, match=problem):
            spec.from_dict({})


def test_checks_run_in_declaration_order_with_their_messages() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Two(bootstrap.ConfigSpec):
        a: typing.Annotated[str, bootstrap.MaxLen(2), bootstrap.Holds(lambda s: s.isdigit(), "must be digits")]
        b: typing.Annotated[int, bootstrap.Range(1, 5)] = 3

    assert Two.from_dict({"a": "12"}) == Two(a="12", b=3)
    with pytest.raises(ConfigError) as caught:
        Two.from_dict({"a": "abc", "b": 9})
    assert [(i.json_path(), i.message) for i in caught.value.issues] == [
        ("$.a", "must be at most 2 characters long"),
        ("$.a", "must be digits"),
        ("$.b", "must be <= 5"),
    ]
