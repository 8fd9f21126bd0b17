"""Bundle images: the converter (bundle_image.py) is reproducible and refuses
hostile archives as extraction does; images.py's probe, mount unit, store
verification and mount inspection on this machine's real kernel (as root)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import bootstrap
import pytest
from test_steps_extract import HOSTILE
from test_steps_support import Behaviour, Member, context, make_config, serve, sha256, special, tar_bytes

PYTHON_DIR = Path(__file__).resolve().parents[1]
CONVERTER = PYTHON_DIR / "bundle_image.py"

needs_mksquashfs = pytest.mark.skipif(
    shutil.which("mksquashfs") is None, reason="mksquashfs is not installed (apt-get install squashfs-tools)"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (run the suite as root)")

BUNDLE: list[Member] = [
    ("top/bin/project-host", b"#!/bin/sh\necho hi\n", 0o700),
    ("top/lib/main.js", b"console.log(1)\n", 0o600),
    ("top/lib/data/a.txt", b"a\n" * 1000, 0o640),
    special("top/bin/main", tarfile.SYMTYPE, "../lib/main.js"),
    special("top/lib/hard", tarfile.LNKTYPE, "top/lib/main.js"),
]


def convert(archive: Path, output: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CONVERTER), str(archive), str(output), *args], capture_output=True, text=True, check=False
    )


@needs_mksquashfs
def test_converter_is_reproducible(tmp_path: Path) -> None:
    archive = tmp_path / "b.tar.xz"
    archive.write_bytes(tar_bytes(BUNDLE))
    first, second = tmp_path / "1.sqfs", tmp_path / "2.sqfs"
    for out in (first, second):
        done = convert(archive, out, "--strip", "1", "--json")
        assert done.returncode == 0, done.stderr
    assert first.read_bytes() == second.read_bytes()
    assert f'"sha256": "{sha256(first.read_bytes())}"' in done.stdout
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob("bundle-image-*"))


@needs_mksquashfs
def test_same_content_other_times_owners_and_order_same_image(tmp_path: Path) -> None:
    files = [m for m in BUNDLE if not isinstance(m, tarfile.TarInfo)]
    plain: list[Member] = list(files)
    a, b = tmp_path / "a.tar", tmp_path / "b.tar.gz"
    a.write_bytes(tar_bytes(plain, "w"))  # mtime 0, uid 0, in order
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, content, mode in reversed(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uid, info.uname = len(content), mode, 1_700_000_000, 1234, "x"
            tar.addfile(info, io.BytesIO(content))
    b.write_bytes(raw.getvalue())
    assert a.read_bytes() != b.read_bytes()
    for src, out in ((a, "a.sqfs"), (b, "b.sqfs")):
        done = convert(src, tmp_path / out, "--strip", "1")
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.sqfs").read_bytes() == (tmp_path / "b.sqfs").read_bytes()


@needs_mksquashfs
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_converter_refuses_hostile_archives(tmp_path: Path, case: str) -> None:
    archive = tmp_path / "evil.tar.xz"
    archive.write_bytes(tar_bytes([("top/ok.txt", b"ok", 0o644), *HOSTILE[case]]))
    done = convert(archive, tmp_path / "out" / "evil.sqfs", "--strip", "1")
    assert done.returncode == 1
    assert "refusing member" in done.stderr and "hint:" in done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # no image, no leftovers
    assert not (tmp_path / "evil").exists()


def test_converter_usage_errors(tmp_path: Path) -> None:
    assert convert(tmp_path / "missing.tar.xz", tmp_path / "o.sqfs").returncode == 1
    assert convert(tmp_path / "missing.tar.xz", tmp_path / "o.sqfs", "--level", "99").returncode == 2


@needs_mksquashfs
@needs_root
def test_image_mounts_read_only_with_normalised_modes(tmp_path: Path) -> None:
    archive = tmp_path / "b.tar.xz"
    archive.write_bytes(tar_bytes(BUNDLE))
    image = tmp_path / "b.sqfs"
    assert convert(archive, image, "--strip", "1").returncode == 0
    where = tmp_path / "mnt"
    where.mkdir()
    subprocess.run(["mount", "-t", "squashfs", "-o", "ro,nosuid,nodev,loop", str(image), str(where)], check=True)
    try:
        assert bootstrap.mounted_image(where) == str(image)  # found through the loop device's backing file
        st = (where / "bin" / "project-host").stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime) == (0o755, 0, 0, 0)
        assert (where / "lib" / "main.js").stat().st_mode & 0o7777 == 0o644  # 0600 in the archive
        assert (where / "lib" / "data").stat().st_mode & 0o7777 == 0o755
        assert (where / "bin" / "main").read_bytes() == b"console.log(1)\n"
        assert (where / "lib" / "hard").stat().st_ino == (where / "lib" / "main.js").stat().st_ino
        with pytest.raises(OSError):
            (where / "new").write_text("x")  # read-only
    finally:
        subprocess.run(["umount", str(where)], check=True)
    assert bootstrap.mounted_image(where) is None


@needs_root
def test_probe_says_this_kernel_mounts_zstd_squashfs() -> None:
    if "squashfs" not in Path("/proc/filesystems").read_text():
        pytest.skip("this kernel has no squashfs loaded; the probe's failure path is covered below")
    assert bootstrap.probe_squashfs_zstd() is None


def test_probe_image_is_a_zstd_squashfs() -> None:
    data = bootstrap.probe_image_bytes()
    assert len(data) == 4096 and data[:4] == b"hsqs"
    assert int.from_bytes(data[20:22], "little") == 6  # compression id 6 = zstd


def test_mount_unit_renders_what_where_and_order(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    text = bootstrap.render_mount_unit(config, "project", "1.0.0")
    root = config.bootstrap_root
    assert "What=/var/lib/cocalc/bundle-images/project/1.0.0.sqfs\n" in text
    assert f"Where={root}/bundles/project/1.0.0\n" in text
    assert "Type=squashfs\nOptions=ro,nosuid,nodev,loop,nofail\n" in text
    assert "Before=cocalc-project-host.service\n" in text
    assert "WantedBy=multi-user.target cocalc-project-host.service\n" in text
    name = bootstrap.mount_unit_name(Path(root) / "bundles" / "project" / "1.0.0")
    assert name.endswith("-bundles-project-1.0.0.mount") and "/" not in name


@needs_root
def test_corrupt_image_is_refused_before_mounting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    monkeypatch.setattr(bootstrap, "IMAGES_DIR", store)
    good = b"hsqs" + b"\0" * 4092
    image = {"url": "http://127.0.0.1:9/p.sqfs", "sha256": sha256(good), "size_bytes": len(good)}
    config = make_config(tmp_path, artifacts={"project": {"image": image}})
    spec = config.artifacts.project
    download = bootstrap.image_download(config, "project", spec)
    download.parent.mkdir(parents=True)
    download.write_bytes(b"hsqs" + b"\1" * 4092)  # changed after the download step verified it
    with pytest.raises(bootstrap.BootstrapError) as failure:
        bootstrap.store_verified_image(config, "project", spec, context(config).log)
    assert "refused before mounting" in failure.value.message and failure.value.hint
    assert list((store / "project").iterdir()) == []  # nothing stored, nothing recorded
    assert not download.exists()
    # the good bytes are moved in, root-owned and read-only, and recorded
    download.write_bytes(good)
    stored = bootstrap.store_verified_image(config, "project", spec, context(config).log)
    st = stored.stat()
    assert (stored, st.st_uid, st.st_mode & 0o777) == (store / "project" / "1.0.0.sqfs", 0, 0o444)
    assert (store / "project" / "1.0.0.sqfs.sha256").read_text().strip() == sha256(good)
    assert not download.exists()


@pytest.mark.parametrize("mounts_images", [True, False])
def test_download_step_fetches_the_image_when_the_kernel_mounts_it_else_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mounts_images: bool
) -> None:
    """The probe's verdict (tested on the real kernel above) decides which of the two is fetched;
    here it is set, to stand for a kernel without squashfs or zstd."""
    archive = tar_bytes(BUNDLE)
    image = b"hsqs" + os.urandom(8188)
    behaviour = Behaviour(files={"/project/1.0.0/p.tar.xz": archive, "/project/1.0.0/p.sqfs": image})
    monkeypatch.setattr(bootstrap, "_support", [None if mounts_images else "no squashfs in this kernel"])
    with serve(behaviour) as url:
        spec = {
            "url": f"{url}/project/1.0.0/p.tar.xz",
            "sha256": sha256(archive),
            "image": {"url": f"{url}/project/1.0.0/p.sqfs", "sha256": sha256(image), "size_bytes": len(image)},
        }
        config = make_config(tmp_path, url, artifacts={"project": spec})
        step = bootstrap.DownloadProjectStep(context(config))
        assert not step.check().satisfied
        step.apply()
        state = step.check()
    assert state.satisfied and ("image" in state.detail) == mounts_images
    fetched = [path for path, _ in behaviour.requests]
    assert fetched == (["/project/1.0.0/p.sqfs"] if mounts_images else ["/project/1.0.0/p.tar.xz"])
    downloads = tmp_path / "home" / "cocalc-host" / "bundles" / ".downloads"
    assert (downloads / "project-1.0.0.sqfs").exists() == mounts_images
    assert (downloads / "project-1.0.0.tar.xz").exists() != mounts_images


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape is not installed (systemd)")
@pytest.mark.parametrize(
    "path",
    [
        "/home/ubuntu/cocalc-host/bundles/project_host/1.0.0",
        "/home/a b/.hidden/x+y/ü/1.2.3-rc.1",
        "/srv/-lead/trail-/a:b_c/v1.0+build.7",
        "/.dot/x",
        "/",
    ],
)
def test_mount_unit_name_is_what_systemd_escape_says(path: str) -> None:
    want = subprocess.run(
        ["systemd-escape", "--path", "--suffix=mount", path], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert bootstrap.mount_unit_name(Path(path)) == want
