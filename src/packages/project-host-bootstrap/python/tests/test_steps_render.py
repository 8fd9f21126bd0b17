"""Pure pieces of the steps: rendered unit and env files, the fstab
transform, os-release and version parsing, the grow helper."""

from __future__ import annotations

import subprocess
from pathlib import Path

import bootstrap
from test_steps_support import make_config

ENTRY = bootstrap.fstab_entry("/var/lib/cocalc/btrfs.img", "/btrfs", loop=True)
FSTAB = "# /etc/fstab\nUUID=abc / ext4 errors=remount-ro 0 1\n/swap.img none swap sw 0 0\n"


def test_fstab_line_is_appended_once_and_replaced(tmp_path: Path) -> None:
    once = bootstrap.fstab_with_entry(FSTAB, ENTRY)
    assert once.startswith(FSTAB)
    assert once.endswith(f"{bootstrap.FSTAB_MARKER}\n{ENTRY}\n")
    assert bootstrap.fstab_with_entry(once, ENTRY) == once  # idempotent
    other = bootstrap.fstab_with_entry(once, bootstrap.fstab_entry("UUID=1234", "/btrfs", loop=False))
    assert "btrfs.img" not in other and other.count("x-cocalc-bootstrap") == 1
    assert other.startswith(FSTAB)
    # a real file round trip, as the step does it (through sudo elsewhere)
    path = tmp_path / "fstab"
    path.write_text(FSTAB)
    path.write_text(bootstrap.fstab_with_entry(path.read_text(), ENTRY))
    assert path.read_text().splitlines()[-1] == ENTRY


def test_fstab_entry_fields() -> None:
    assert ENTRY.split() == [
        "/var/lib/cocalc/btrfs.img",
        "/btrfs",
        "btrfs",
        "defaults,nofail,noatime,loop,x-cocalc-bootstrap",
        "0",
        "0",
    ]
    assert bootstrap.fstab_entry("/data/my disk.img", "/btrfs", loop=True).split()[0] == "/data/my\\040disk.img"
    assert "loop" not in bootstrap.fstab_entry("UUID=1", "/btrfs", loop=False)


def test_untagged_lines_survive() -> None:
    text = "/dev/sdb /btrfs btrfs defaults 0 0\n#x-cocalc-bootstrap in a comment\n"
    assert bootstrap.fstab_with_entry(text, ENTRY).startswith(text)


def test_unit_file(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    unit = bootstrap.render_unit(config, "staff")
    lines = unit.splitlines()
    root = config.bootstrap_root
    for line in (
        f"User={config.bootstrap_user}",
        "Group=staff",
        "EnvironmentFile=/etc/cocalc/project-host.env",
        f"ExecStart={root}/bundles/project_host/current/bin/project-host",
        "RequiresMountsFor=/btrfs",
        "Restart=on-failure",
        "RestartSec=2",
        "WantedBy=multi-user.target",
    ):
        assert line in lines
    assert bootstrap.systemd_quote("/a b/%h") == '"/a b/%%h"'


def test_env_file_values_survive_quoting(tmp_path: Path) -> None:
    tricky = 'a "quoted" $HOME `cmd` back\\slash and spaces'
    config = make_config(tmp_path, env={"TRICKY": tricky, "COCALC_HOST_NAME": "override"})
    text = bootstrap.render_env_file(config)
    path = tmp_path / "project-host.env"
    path.write_text(text)
    # sh reads double-quoted values like systemd's EnvironmentFile= does
    script = f'. "{path}"; printf "%s\\n%s\\n%s\\n" "$TRICKY" "$COCALC_HOST_NAME" "$PATH"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == tricky
    assert out[1] == "override"  # config.env wins
    assert out[2].startswith(f"{config.home}/.nvm/versions/node/v{config.node.version}/bin:")
    assert "COCALC_HOST_ID=" in text and "COCALC_CONAT_URLS=" in text


def test_env_helper_and_grow_helper_are_valid_sh(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    helper = tmp_path / "env.sh"
    helper.write_text(bootstrap.render_env_helper(config))
    out = subprocess.run(["sh", "-c", f'. "{helper}"; echo "$PATH"'], capture_output=True, text=True, check=True)
    assert f"{config.home}/.nvm/versions/node/v{config.node.version}/bin" in out.stdout
    for image in ("/var/lib/cocalc/btrfs.img", None):
        grow = tmp_path / "btrfs-grow"
        grow.write_text(bootstrap.render_grow_helper("/btrfs", image))
        subprocess.run(["sh", "-n", str(grow)], check=True)
    grow.write_text(bootstrap.render_grow_helper("/btrfs", "/img"))
    usage = subprocess.run(["sh", str(grow), "lots"], capture_output=True, text=True)
    assert usage.returncode == 2 and "whole number" in usage.stderr


def test_os_release_and_versions(tmp_path: Path) -> None:
    path = tmp_path / "os-release"
    path.write_text('PRETTY_NAME="Ubuntu 24.04.1 LTS"\nID=ubuntu\nVERSION_ID="24.04"\n# comment\n')
    release = bootstrap.read_os_release(str(path))
    assert release["ID"] == "ubuntu" and release["VERSION_ID"] == "24.04"
    assert bootstrap.version_tuple("24.04") == (24, 4)
    assert bootstrap.version_tuple("24.10") > bootstrap.version_tuple("24.4")  # numeric, not text
    assert bootstrap.version_tuple("12") >= bootstrap.version_tuple("12")
    assert bootstrap.version_tuple("11") < bootstrap.version_tuple("12")
