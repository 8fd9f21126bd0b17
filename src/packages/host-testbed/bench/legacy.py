#!/usr/bin/env python3
"""The legacy reference run and the isolated costs, inside a fresh throwaway host.

The old bootstrap's serial flow (../shared/UPSTREAM.md): apt-get update,
apt-get install (with recommends), then per bundle download + sha256 check +
`tar -xJf`, then Node's tarball the same way. Every command runs alone, so
each one's wall time and CPU-seconds (os.wait4 rusage: the process and the
children it reaped) are also that piece's isolated cost. `tar -xJf` is run
as what it is, `xz -dc | tar -x` (GNU tar forks xz the same way), so the
decompression (xz) and the file writing (tar) are measured apart.

After the legacy run (not part of its wall time) the bundles' squashfs images
are measured the same way: download, sha256, mount read-only, unmount; and the
bundles' `.tar.zst` archives (same tar content): download, sha256,
`zstd -dc | tar -x` (zstd and tar measured apart, like xz and tar).

Usage: legacy.py SPEC.json; prints one JSON object on stdout:
{"legacy_wall_s": ..., "pieces": [{"name", "group", "wall_s", "user_s", "sys_s", "bytes"}]}
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "NEEDRESTART_MODE": "a",
    "APT_LISTCHANGES_FRONTEND": "none",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}


class Pieces:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, group: str, wall: float, user: float, sys_: float, nbytes: int | None = None) -> None:
        self.items.append(
            {
                "name": name,
                "group": group,
                "wall_s": round(wall, 3),
                "user_s": round(user, 3),
                "sys_s": round(sys_, 3),
                "bytes": nbytes,
            }
        )


def wait_rusage(proc: subprocess.Popen[bytes]) -> tuple[int, float, float]:
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_utime, ru.ru_stime


def run(argv: list[str], pieces: Pieces, name: str, group: str, nbytes: int | None = None) -> None:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, env=APT_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    code, user, sys_ = wait_rusage(proc)
    if code != 0:
        raise SystemExit(f"legacy: {' '.join(argv)} exited with {code}: {err.decode(errors='replace')[-2000:]}")
    pieces.add(name, group, time.monotonic() - t0, user, sys_, nbytes)


def sha256_check(path: str, want: str, pieces: Pieces, name: str, group: str) -> None:
    # sha256sum -c, as the old script did (a child process, so its CPU is measured like the others)
    t0 = time.monotonic()
    proc = subprocess.Popen(["sha256sum", path], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    code, user, sys_ = wait_rusage(proc)
    got = out.split()[0] if out.split() else ""
    if code != 0 or got != want:
        raise SystemExit(f"legacy: sha256 of {path} is {got or '?'}, expected {want}")
    pieces.add(name, group, time.monotonic() - t0, user, sys_, os.path.getsize(path))


def extract(
    archive: str,
    dest: str,
    strip: int,
    pieces: Pieces,
    artifact: str,
    group: str,
    decompressor: str = "xz",
    prefix: str = "",
) -> None:
    """tar -xJf archive -C dest --strip-components=strip, as xz -dc | tar -x (or zstd -dc | tar -x)."""
    os.makedirs(dest, exist_ok=True)
    t0 = time.monotonic()
    xz = subprocess.Popen([decompressor, "-dc", "--", archive], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    tar = subprocess.Popen(
        ["tar", "-x", "-f", "-", "-C", dest, f"--strip-components={strip}", "--no-same-owner"],
        stdin=xz.stdout,
        stderr=subprocess.PIPE,
    )
    assert xz.stdout is not None and tar.stderr is not None
    xz.stdout.close()
    err = tar.stderr.read()
    tar.stderr.close()
    tar_code, tar_user, tar_sys = wait_rusage(tar)
    xz_code, xz_user, xz_sys = wait_rusage(xz)
    wall = time.monotonic() - t0
    if tar_code != 0 or xz_code != 0:
        tail = err.decode(errors="replace")[-2000:]
        raise SystemExit(f"legacy: extracting {archive}: {decompressor} {xz_code}, tar {tar_code}: {tail}")
    pieces.add(f"{prefix}decompress_{artifact}", group, wall, xz_user, xz_sys)
    pieces.add(f"{prefix}write_{artifact}", group, wall, tar_user, tar_sys)


def download(url: str, path: str, pieces: Pieces, name: str, group: str) -> None:
    run(["curl", "-fsS", "--retry", "3", "-o", path, url], pieces, name, group)
    pieces.items[-1]["bytes"] = os.path.getsize(path)


def apt_alone(spec: dict[str, Any]) -> None:
    """Not legacy: bootstrap.py's own apt work alone on a fresh host, the
    isolated cost of the new runs' apt chain (no recommends, its options,
    man-db's trigger off as its apt step does). The argv and environment
    come from the bootstrap.py the runs use (`apt_get_argv`, `APT_ENV`), so
    they cannot drift apart."""
    loader = importlib.util.spec_from_file_location("cocalc_bootstrap_for_apt", spec["bootstrap_py"])
    assert loader is not None and loader.loader is not None
    bootstrap = importlib.util.module_from_spec(loader)
    sys.modules[loader.name] = bootstrap  # dataclasses look their module up there
    loader.loader.exec_module(bootstrap)
    os.environ.update(bootstrap.APT_ENV)
    with contextlib.suppress(FileNotFoundError):
        os.unlink("/var/lib/man-db/auto-update")
    pieces = Pieces()
    t0 = time.monotonic()
    run(bootstrap.apt_get_argv(["update"], 300), pieces, "new_apt_update", "new_apt")
    run(
        bootstrap.apt_get_argv(["install", "--no-install-recommends", *spec["apt_packages"]], 300),
        pieces,
        "new_apt_install",
        "new_apt",
    )
    print(json.dumps({"legacy_wall_s": round(time.monotonic() - t0, 3), "pieces": pieces.items}))


def main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("mode") == "apt_alone":
        apt_alone(spec)
        return
    work = spec["work_dir"]
    os.makedirs(work, exist_ok=True)
    pieces = Pieces()
    t0 = time.monotonic()
    # 1. packages
    run(["apt-get", "update", "-q"], pieces, "apt_update", "apt")
    run(["apt-get", "install", "-y", "-q", *spec["apt_packages"]], pieces, "apt_install", "apt")
    # 2. the bundles, one after the other
    for b in spec["bundles"]:
        a = b["artifact"]
        path = os.path.join(work, os.path.basename(b["url"]))
        download(b["url"], path, pieces, f"download_{a}", a)
        sha256_check(path, b["sha256"], pieces, f"verify_{a}", a)
        extract(path, b["dest"], b["strip"], pieces, a, a)
    # 3. Node
    node = spec["node"]
    path = os.path.join(work, node["file"])
    download(node["url"], path, pieces, "download_node", "node")
    sums = os.path.join(work, "SHASUMS256.txt")
    run(["curl", "-fsS", "-o", sums, node["shasums_url"]], pieces, "download_node_sums", "node")
    with open(sums, encoding="utf-8") as f:
        want = next(line.split()[0] for line in f if line.split()[1:] == [node["file"]])
    sha256_check(path, want, pieces, "verify_node", "node")
    extract(path, node["dest"], 1, pieces, "node", "node")
    legacy_wall = time.monotonic() - t0
    # 4. not legacy: the images, measured alone (download, sha256, mount, unmount)
    for im in spec.get("images", []):
        a = im["artifact"]
        path = os.path.join(work, os.path.basename(im["url"]))
        download(im["url"], path, pieces, f"image_download_{a}", f"image_{a}")
        sha256_check(path, im["sha256"], pieces, f"image_verify_{a}", f"image_{a}")
        mnt = os.path.join(work, f"mnt-{a}")
        os.makedirs(mnt, exist_ok=True)
        run(
            ["mount", "-t", "squashfs", "-o", "ro,loop,nosuid,nodev", path, mnt],
            pieces,
            f"image_mount_{a}",
            f"image_{a}",
        )
        subprocess.run(["umount", mnt], check=False)
    # 5. not legacy: the .tar.zst archives, measured alone (download, sha256, zstd -dc | tar -x)
    for z in spec.get("zst", []):
        a = z["artifact"]
        path = os.path.join(work, os.path.basename(z["url"]))
        download(z["url"], path, pieces, f"zst_download_{a}", f"zst_{a}")
        sha256_check(path, z["sha256"], pieces, f"zst_verify_{a}", f"zst_{a}")
        extract(path, z["dest"], z["strip"], pieces, a, f"zst_{a}", decompressor="zstd", prefix="zst_")
    print(json.dumps({"legacy_wall_s": round(legacy_wall, 3), "pieces": pieces.items}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: legacy.py SPEC.json")
    main(sys.argv[1])
