"""python/build.py: the shipped bootstrap.py is the modules, built reproducibly, and the
build refuses module shapes that would not mean the same once concatenated."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

PYTHON_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PYTHON_DIR))

import build  # noqa: E402


@pytest.fixture
def package(tmp_path: Path) -> Path:
    copy = tmp_path / "cocalc_bootstrap"
    shutil.copytree(build.PACKAGE, copy)
    return copy


def test_the_committed_bootstrap_py_is_a_fresh_build() -> None:
    assert build.OUTPUT.read_text(encoding="utf-8") == build.build()


def test_two_builds_are_identical(package: Path) -> None:
    assert build.build(package) == build.build(package)


def test_every_module_is_a_section_and_no_module_is_too_long() -> None:
    text = build.build()
    for name in build.MODULES:
        assert f"\n# {name}: " in text
        lines = (build.PACKAGE / f"{name}.py").read_text(encoding="utf-8").count("\n")
        assert lines <= build.MAX_MODULE_LINES, name
    assert "from ." not in text  # no package import survives


def test_an_upward_import_is_refused(package: Path) -> None:
    errors = package / "errors.py"
    errors.write_text(
        errors.read_text().replace(
            "from __future__ import annotations\n", "from __future__ import annotations\n\nfrom .cli import main\n", 1
        )
    )
    with pytest.raises(build.BuildError, match=r"errors\.py imports \['main'\] from \.cli"):
        build.build(package)


def test_a_name_defined_in_two_modules_is_refused(package: Path) -> None:
    (package / "cli.py").write_text((package / "cli.py").read_text() + "\n\ndef clip() -> None:\n    pass\n")
    with pytest.raises(build.BuildError, match=r"clip is defined in both log\.py and cli\.py"):
        build.build(package)


def test_an_import_after_code_is_refused(package: Path) -> None:
    (package / "cli.py").write_text((package / "cli.py").read_text() + "\n\nimport zlib\n")
    with pytest.raises(build.BuildError, match=r"cli\.py:\d+: import after code"):
        build.build(package)


def test_a_module_missing_from_the_list_is_refused(package: Path) -> None:
    (package / "extra.py").write_text('"""x"""\n')
    with pytest.raises(build.BuildError, match=r"\['extra'\] are not in MODULES"):
        build.build(package)


def test_check_mode_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bootstrap.py"
    assert build.main(["--out", str(out)]) == 0
    assert build.main(["--out", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "# hand edit\n")
    assert build.main(["--out", str(out), "--check"]) == 1
    assert "differs from a fresh build" in capsys.readouterr().err
