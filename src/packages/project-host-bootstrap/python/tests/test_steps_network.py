"""The metadata rule (rendered nft file and unit, what check() sees) and taking
a tunnel, a GPU or the rule away when the config no longer has them. The real
runs (nft, systemd, dpkg) are on the throwaway host (host-testbed e2e); here
systemctl is recorded, because this machine's PID 1 is not systemd, while
the files are really removed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bootstrap
import pytest
from test_steps_support import context, make_config

CLOUDFLARED = {
    "deb": {
        "url": "https://artifacts.example.org/cloudflared/2025.1.0/cloudflared-linux-amd64.deb",
        "sha256": "a" * 64,
        "version": "2025.1.0",
    },
    "hostname": "h1.tunnel.example.org",
}
GPU = {
    "repo_url": "https://nvidia.example.org/libnvidia-container/stable/deb/amd64",
    "keyring_url": "https://nvidia.example.org/libnvidia-container/gpgkey.gpg",
    "keyring_sha256": "b" * 64,
}


def test_metadata_rule_blocks_every_uid_but_root_and_all_forwarded_traffic() -> None:
    nft = bootstrap.render_metadata_nft(["169.254.169.254", "127.77.3.4"]).splitlines()
    # replaces only its own table, in one transaction (never `flush ruleset`)
    assert nft[4:7] == [
        "table inet cocalc_metadata",
        "delete table inet cocalc_metadata",
        "table inet cocalc_metadata {",
    ]
    assert not any("flush" in line for line in nft)
    rules = [line.strip() for line in nft if "daddr" in line]
    assert rules == [
        "ip daddr { 169.254.169.254, 127.77.3.4 } meta skuid != 0 counter reject with icmpx type admin-prohibited",
        "ip daddr { 169.254.169.254, 127.77.3.4 } counter reject with icmpx type admin-prohibited",
    ]
    assert "type filter hook output priority filter; policy accept;" in [line.strip() for line in nft]
    assert "type filter hook forward priority filter; policy accept;" in [line.strip() for line in nft]


def test_metadata_unit_loads_the_file_at_boot_and_never_unloads_it() -> None:
    unit = bootstrap.render_metadata_unit().splitlines()
    assert "ExecStart=/usr/sbin/nft -f /etc/nftables.d/cocalc-metadata.nft" in unit
    assert "RemainAfterExit=yes" in unit and "WantedBy=multi-user.target" in unit
    assert "Before=network-pre.target shutdown.target" in unit
    assert "ReloadPropagatedFrom=nftables.service" in unit  # nftables.service's stock file flushes everything
    assert not any(line.startswith("ExecStop") for line in unit)  # stopping the unit must not open the way


def test_metadata_defaults_to_the_cloud_address_and_null_turns_it_off(tmp_path: Path) -> None:
    assert make_config(tmp_path).metadata_block == bootstrap.MetadataBlockSpec(addresses=("169.254.169.254",))
    assert make_config(tmp_path, metadata_block=None).metadata_block is None
    with pytest.raises(bootstrap.ConfigError, match=r"metadata_block\.addresses\[0\]"):
        make_config(tmp_path, metadata_block={"addresses": ["169.254.169.254/32"]})


def test_service_starts_only_after_the_metadata_rule() -> None:
    by_name = {s.name: s for s in bootstrap.STEPS}
    assert "metadata" in by_name["service"].deps and by_name["metadata"].deps == ("apt",)


class Recorder:
    """run_command stand-in: records systemctl/apt-get/nft/dpkg-query, runs rm for real."""

    def __init__(self, real: Callable[..., bootstrap.CommandResult]) -> None:
        self.real = real
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], **kwargs: Any) -> bootstrap.CommandResult:
        argv = list(argv)
        if argv[0] == "rm":
            return self.real(argv, **{k: v for k, v in kwargs.items() if k != "sudo"})
        self.calls.append(argv)
        installed = argv[0] == "dpkg-query" and "cloudflared" in argv
        output = "cloudflared\tii \n" if installed else ("inactive" if argv[0] == "systemctl" else "")
        code = 0 if installed else 1
        return bootstrap.CommandResult(argv=tuple(argv), returncode=code, duration_s=0.0, output=output, tail=output)


@pytest.fixture
def system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Recorder]:
    """/etc in tmp_path: the unit dir, /etc/cloudflared, the NVIDIA and nftables files."""
    etc = tmp_path / "etc"
    units = etc / "systemd" / "system"
    units.mkdir(parents=True)
    (etc / "cloudflared").mkdir()
    for name, path in {
        "SYSTEMD_UNIT_DIR": units,
        "CLOUDFLARED_TOKEN_ENV": etc / "cloudflared" / "token.env",
        "CLOUDFLARED_CONFIG": etc / "cloudflared" / "config.yml",
        "NVIDIA_KEYRING": etc / "keyrings" / "nvidia.gpg",
        "NVIDIA_SOURCES": etc / "apt" / "nvidia-container-toolkit.list",
        "CDI_HELPER": etc / "sbin" / "cocalc-nvidia-cdi",
        "CDI_SPEC": str(etc / "cdi" / "nvidia.yaml"),
        "METADATA_NFT_FILE": etc / "nftables.d" / "cocalc-metadata.nft",
        "NFT": str(tmp_path / "no-nft-here"),
    }.items():
        monkeypatch.setattr(bootstrap, name, path)
    recorder = Recorder(bootstrap.run_command)
    monkeypatch.setattr(bootstrap, "run_command", recorder)
    return etc, recorder


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_tunnel_taken_away_removes_unit_token_config_and_package(tmp_path: Path, system: tuple[Path, Recorder]) -> None:
    etc, rec = system
    unit = etc / "systemd" / "system" / "cocalc-cloudflared.service"
    write(unit, bootstrap.render_cloudflared_unit())
    write(etc / "cloudflared" / "token.env", "TUNNEL_TOKEN=x\n")
    write(etc / "cloudflared" / "config.yml", bootstrap.render_cloudflared_config("h.example.org", 9002))
    step = bootstrap.TunnelStep(context(make_config(tmp_path)))  # no cloudflared section any more
    state = step.check()
    assert not state.satisfied and "left over from an earlier tunnel" in state.detail and "token.env" in state.detail
    step.apply()
    assert not unit.exists() and not (etc / "cloudflared" / "token.env").exists()
    assert not (etc / "cloudflared" / "config.yml").exists()
    assert ["systemctl", "disable", "--now", "cocalc-cloudflared.service"] in rec.calls
    assert ["systemctl", "daemon-reload"] in rec.calls
    assert any(c[0] == "apt-get" and c[-2:] == ["purge", "cloudflared"] for c in rec.calls)
    assert step.check() == bootstrap.StepState(True, "no tunnel configured")


def test_tunnel_removal_leaves_an_operators_own_cloudflared_config_alone(
    tmp_path: Path, system: tuple[Path, Recorder]
) -> None:
    etc, rec = system
    write(etc / "cloudflared" / "config.yml", "tunnel: mine\n")
    step = bootstrap.TunnelStep(context(make_config(tmp_path)))
    assert step.check().satisfied
    step.apply()
    assert (etc / "cloudflared" / "config.yml").read_text() == "tunnel: mine\n" and rec.calls == []


def test_gpu_taken_away_removes_timer_helper_repository_keyring_and_spec(
    tmp_path: Path, system: tuple[Path, Recorder]
) -> None:
    etc, rec = system
    files = bootstrap.GpuStep(context(make_config(tmp_path, gpu=GPU))).files()
    for path, (content, _) in files.items():
        write(path, content)
    write(etc / "keyrings" / "nvidia.gpg", "key")
    write(etc / "cdi" / "nvidia.yaml", "cdiVersion: 0.5.0\n")
    step = bootstrap.GpuStep(context(make_config(tmp_path)))  # gpu: null now
    state = step.check()
    assert not state.satisfied and "left over from an earlier GPU config" in state.detail
    step.apply()
    assert [p for p in (*files, etc / "keyrings" / "nvidia.gpg", etc / "cdi" / "nvidia.yaml") if p.exists()] == []
    assert ["systemctl", "disable", "--now", "cocalc-nvidia-cdi.timer"] in rec.calls
    assert ["systemctl", "disable", "--now", "cocalc-nvidia-cdi.service"] in rec.calls
    assert step.check() == bootstrap.StepState(True, "no GPU configured")


def test_gpu_removal_never_touches_a_keyring_it_did_not_install(tmp_path: Path, system: tuple[Path, Recorder]) -> None:
    etc, rec = system
    write(etc / "keyrings" / "nvidia.gpg", "the operator's")
    step = bootstrap.GpuStep(context(make_config(tmp_path)))
    assert step.check().satisfied
    step.apply()
    assert (etc / "keyrings" / "nvidia.gpg").exists() and rec.calls == []


def test_metadata_rule_taken_away_removes_unit_and_file(tmp_path: Path, system: tuple[Path, Recorder]) -> None:
    etc, rec = system
    unit = etc / "systemd" / "system" / "cocalc-metadata-block.service"
    write(unit, bootstrap.render_metadata_unit())
    write(etc / "nftables.d" / "cocalc-metadata.nft", bootstrap.render_metadata_nft(["169.254.169.254"]))
    step = bootstrap.MetadataBlockStep(context(make_config(tmp_path, metadata_block=None)))
    state = step.check()
    assert not state.satisfied and "left over" in state.detail
    step.apply()
    assert not unit.exists() and not (etc / "nftables.d" / "cocalc-metadata.nft").exists()
    assert ["systemctl", "disable", "--now", "cocalc-metadata-block.service"] in rec.calls
    assert step.check() == bootstrap.StepState(True, "no metadata rule configured")


def test_metadata_rule_wanted_but_nft_missing_says_which_package(tmp_path: Path, system: tuple[Path, Recorder]) -> None:
    state = bootstrap.MetadataBlockStep(context(make_config(tmp_path))).check()
    assert not state.satisfied and "(package nftables)" in state.detail


def test_upstreams_project_host_bundle_unpacks_with_strip_2_as_gnu_tar_does(tmp_path: Path) -> None:
    """`tar Jcf x.tar.xz ./cocalc-project-host-<v>-<arch>-<os>`: members start with "./",
    which GNU tar counts as a component, so upstream unpacks it with --strip-components=2."""
    import subprocess
    import tarfile

    top = "cocalc-project-host-1.2.3-amd64-linux"
    src = tmp_path / "src" / top
    src.mkdir(parents=True)
    (src / "cocalc-project-host").write_text("#!/bin/sh\necho sea\n")
    (src / "cocalc-project-host").chmod(0o755)
    (src / "node").symlink_to("cocalc-project-host")
    archive = tmp_path / f"{top}.tar"
    subprocess.run(["tar", "-C", str(tmp_path / "src"), "-cf", str(archive), f"./{top}"], check=True)
    with tarfile.open(archive) as tar:
        assert tar.getnames()[0] == f"./{top}"
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    bootstrap.extract_safely(archive, ours, strip=2)
    subprocess.run(["tar", "-C", str(theirs), "--strip-components=2", "-xf", str(archive)], check=True)
    assert (
        sorted(p.name for p in ours.iterdir())
        == sorted(p.name for p in theirs.iterdir())
        == [
            "cocalc-project-host",
            "node",
        ]
    )
    assert (ours / "node").readlink() == Path("cocalc-project-host")
    assert bootstrap.member_parts("./a/./b//c", 2) == ["b", "c"]  # tar: ".", "a" stripped; "." and "" skipped after
    assert bootstrap.member_parts("./", 2) is None and bootstrap.member_parts("a/b", 0) == ["a", "b"]
