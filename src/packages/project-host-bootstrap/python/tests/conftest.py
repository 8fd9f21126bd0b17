"""Make `import bootstrap` work in every test (bootstrap.py lives one directory up);
give every test a temp directory of its own."""

import sys
import tempfile
from pathlib import Path

import pytest

PYTHON_DIR = str(Path(__file__).resolve().parents[1])
if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)


@pytest.fixture(autouse=True)
def private_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test's temporary files (write_root_file's sources) in a directory of its own, and
    remove_debris looking only there: a run's debris cleanup must not remove another test
    run's files from the shared /tmp (several test runs may share this machine, all as root)."""
    import bootstrap

    tmp = tmp_path_factory.mktemp("tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(bootstrap, "SYSTEM_TMP", tmp)
