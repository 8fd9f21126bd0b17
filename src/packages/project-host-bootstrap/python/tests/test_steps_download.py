"""Downloads against a real HTTP server on 127.0.0.1: verification, .sha256
files, resume after a cut connection, servers that ignore Range, and
nothing left at the target when anything is wrong."""

from __future__ import annotations

import os
from pathlib import Path

import bootstrap
import pytest
from test_steps_support import Behaviour, context, make_config, serve, sha256

BODY = os.urandom(3 * 1024 * 1024 + 123)  # a few chunks, not a multiple of the chunk size
LOG = bootstrap.Log(echo=False)


def test_download_with_config_sha256(tmp_path: Path) -> None:
    with serve(Behaviour(files={"/a.tar.xz": BODY})) as url:
        target = tmp_path / "a.tar.xz"
        digest = bootstrap.download_verified(f"{url}/a.tar.xz", target, sha256(BODY), log=LOG)
    assert digest == sha256(BODY)
    assert target.read_bytes() == BODY
    assert bootstrap.verified_download(target, sha256(BODY))
    assert not target.with_name("a.tar.xz.part").exists()


def test_resume_after_the_server_cuts_the_connection(tmp_path: Path) -> None:
    behaviour = Behaviour(files={"/a.tar.xz": BODY}, cut_after={"/a.tar.xz": [1_000_000, 500_000]})
    with serve(behaviour) as url:
        target = tmp_path / "a.tar.xz"
        bootstrap.download_verified(f"{url}/a.tar.xz", target, sha256(BODY), log=LOG)
    assert target.read_bytes() == BODY
    ranges = [r for path, r in behaviour.requests if path == "/a.tar.xz"]
    assert ranges == [None, "bytes=1000000-", "bytes=1500000-"]  # resumed, not restarted


def test_server_that_ignores_range_restarts_the_hash(tmp_path: Path) -> None:
    behaviour = Behaviour(files={"/a.tar.xz": BODY}, cut_after={"/a.tar.xz": [700_000]}, ignore_range={"/a.tar.xz"})
    with serve(behaviour) as url:
        target = tmp_path / "a.tar.xz"
        bootstrap.download_verified(f"{url}/a.tar.xz", target, sha256(BODY), log=LOG)
    assert target.read_bytes() == BODY  # a 200 to a Range request: started over, not appended
    assert [r for _, r in behaviour.requests] == [None, "bytes=700000-"]


def test_published_sha256_file_is_fetched_and_parsed(tmp_path: Path) -> None:
    files = {"/b/a.tar.xz": BODY, "/b/a.tar.xz.sha256": f"{sha256(BODY)}  a.tar.xz\n".encode()}
    with serve(Behaviour(files=files)) as url:
        target = tmp_path / "a.tar.xz"
        assert bootstrap.download_verified(f"{url}/b/a.tar.xz", target, None, log=LOG) == sha256(BODY)
    assert target.read_bytes() == BODY


def test_no_checksum_anywhere_fails_and_downloads_nothing(tmp_path: Path) -> None:
    behaviour = Behaviour(files={"/a.tar.xz": BODY})
    with serve(behaviour) as url, pytest.raises(bootstrap.BootstrapError) as failure:
        bootstrap.download_verified(f"{url}/a.tar.xz", tmp_path / "a.tar.xz", None, log=LOG)
    assert "no checksum" in failure.value.message and "a.tar.xz.sha256" in failure.value.message
    assert failure.value.hint and "unverified" in failure.value.hint
    assert [p for p, _ in behaviour.requests] == ["/a.tar.xz.sha256"]
    assert list(tmp_path.iterdir()) == []


def test_mismatch_fails_and_leaves_nothing_at_the_target(tmp_path: Path) -> None:
    with serve(Behaviour(files={"/a.tar.xz": BODY})) as url, pytest.raises(bootstrap.BootstrapError) as failure:
        bootstrap.download_verified(f"{url}/a.tar.xz", tmp_path / "a.tar.xz", "0" * 64, log=LOG)
    assert "verification failed" in failure.value.message and sha256(BODY) in failure.value.message
    assert list(tmp_path.iterdir()) == []


def test_404_fails_without_retrying_forever(tmp_path: Path) -> None:
    behaviour = Behaviour()
    with serve(behaviour) as url, pytest.raises(bootstrap.BootstrapError) as failure:
        bootstrap.download_verified(f"{url}/gone.tar.xz", tmp_path / "gone.tar.xz", "0" * 64, log=LOG)
    assert "HTTP 404" in failure.value.message
    assert len(behaviour.requests) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A" * 64 + "  a.tar.xz\n", "a" * 64),
        ("b" * 64 + " *a.tar.xz\n", "b" * 64),
        ("c" * 64 + "\n", "c" * 64),
        ("d" * 64 + "  other.tar.xz\n" + "e" * 64 + "  a.tar.xz\n", "e" * 64),
    ],
)
def test_parse_sha256_file_accepts_sha256sum_format(text: str, expected: str) -> None:
    assert bootstrap.parse_sha256_file(text, "a.tar.xz") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",  # nothing
        "<html>not found</html>",  # an error page served with 200
        "a" * 63 + "  a.tar.xz",  # too short
        "a" * 64 + "  other.tar.xz",  # another file's checksum
        "a" * 64 + "  a.tar.xz\n" + "b" * 64 + "  a.tar.xz",  # two different ones
        "a" * 64 + "\n" + "b" * 64,  # two lone checksums
    ],
)
def test_parse_sha256_file_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        bootstrap.parse_sha256_file(text, "a.tar.xz")


def test_download_step_check_and_apply(tmp_path: Path) -> None:
    behaviour = Behaviour(files={"/project/1.0.0/project.tar.gz": BODY})
    with serve(behaviour) as url:
        spec = {"url": f"{url}/project/1.0.0/project.tar.gz", "version": "1.0.0", "sha256": sha256(BODY)}
        config = make_config(tmp_path, url, artifacts={"project": spec})
        step = bootstrap.DownloadProjectStep(context(config))
        assert not step.check().satisfied
        step.apply()
        state = step.check()
        assert state.satisfied and "downloaded and verified" in state.detail
        step.apply()  # satisfied: no second download
    assert len(behaviour.requests) == 1
    archive = Path(config.bootstrap_root) / "bundles" / ".downloads" / "project-1.0.0.tar.gz"
    assert archive.read_bytes() == BODY
