"""Node.js from a tiny fake dist mirror (official layout, SHASUMS256.txt)
served on 127.0.0.1, installed into nvm's layout under a temporary home."""

from __future__ import annotations

import os
from pathlib import Path

import bootstrap
import pytest
from test_steps_support import Behaviour, context, make_config, serve, sha256, tar_bytes

VERSION = "20.1.2"
NAME = f"node-v{VERSION}-linux-x64.tar.xz"


def node_tarball(prints: str = f"v{VERSION}") -> bytes:
    top = f"node-v{VERSION}-linux-x64"
    return tar_bytes(
        [
            (f"{top}/bin/node", f"#!/bin/sh\necho {prints}\n".encode(), 0o755),
            (f"{top}/lib/node_modules/npm/bin/npm-cli.js", b"// npm\n", 0o644),
            (f"{top}/README.md", b"node\n", 0o644),
        ]
    )


def mirror(tarball: bytes, listed_sha: str | None = None) -> Behaviour:
    sums = f"{'1' * 64}  node-v{VERSION}-linux-arm64.tar.xz\n{listed_sha or sha256(tarball)}  {NAME}\n"
    return Behaviour(files={f"/dist/v{VERSION}/{NAME}": tarball, f"/dist/v{VERSION}/SHASUMS256.txt": sums.encode()})


def test_node_installs_into_nvm_layout(tmp_path: Path) -> None:
    behaviour = mirror(node_tarball())
    with serve(behaviour) as url:
        config = make_config(tmp_path, url, node={"version": VERSION, "dist_url": f"{url}/dist"})
        step = bootstrap.NodeStep(context(config))
        assert not step.check().satisfied
        step.apply()
        state = step.check()
        assert state.satisfied, state.detail
        step.apply()  # nothing to do: no second download
    home = Path(config.home)
    node = home / ".nvm" / "versions" / "node" / f"v{VERSION}" / "bin" / "node"
    assert os.access(node, os.X_OK)
    assert (home / ".nvm" / "alias" / "default").read_text() == f"v{VERSION}"
    assert [p for p, _ in behaviour.requests].count(f"/dist/v{VERSION}/{NAME}") == 1
    assert sorted(os.listdir(node.parents[2])) == [f"v{VERSION}"]  # no staging left
    assert not list((Path(config.bootstrap_root) / "bundles" / ".downloads").iterdir())


def test_node_checksum_mismatch_installs_nothing(tmp_path: Path) -> None:
    with serve(mirror(node_tarball(), listed_sha="2" * 64)) as url:
        config = make_config(tmp_path, url, node={"version": VERSION, "dist_url": f"{url}/dist"})
        with pytest.raises(bootstrap.BootstrapError, match="verification failed"):
            bootstrap.NodeStep(context(config)).apply()
    assert not (Path(config.home) / ".nvm" / "versions").exists()


def test_node_that_reports_another_version_is_not_installed(tmp_path: Path) -> None:
    with serve(mirror(node_tarball(prints="v0.0.1"))) as url:
        config = make_config(tmp_path, url, node={"version": VERSION, "dist_url": f"{url}/dist"})
        with pytest.raises(bootstrap.BootstrapError, match=r"says 'v0\.0\.1'"):
            bootstrap.NodeStep(context(config)).apply()
    versions = Path(config.home) / ".nvm" / "versions" / "node"
    assert os.listdir(versions) == []


def test_pinned_nvm_is_installed_and_checked(tmp_path: Path) -> None:
    behaviour = mirror(node_tarball())
    nvm_sh = b"# nvm.sh, pinned\nnvm() { :; }\n"
    behaviour.files["/nvm/v0.40.1/nvm.sh"] = nvm_sh
    with serve(behaviour) as url:
        nvm = {"version": "0.40.1", "url": f"{url}/nvm/v0.40.1/nvm.sh", "sha256": sha256(nvm_sh)}
        config = make_config(tmp_path, url, node={"version": VERSION, "dist_url": f"{url}/dist", "nvm": nvm})
        step = bootstrap.NodeStep(context(config))
        step.apply()
        assert step.check().satisfied
        (Path(config.home) / ".nvm" / "nvm.sh").write_text("# changed by hand\n")
        state = step.check()
        assert not state.satisfied and "nvm.sh" in state.detail
