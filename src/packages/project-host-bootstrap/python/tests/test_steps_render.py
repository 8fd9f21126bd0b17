"""Pure pieces of the steps: rendered unit and env files, the fstab
transform, os-release and version parsing, the grow helper."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import bootstrap
import pytest
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
        f"RequiresMountsFor={config.btrfs.mount_point}",
        "Restart=on-failure",
        "RestartSec=2",
        "WantedBy=multi-user.target",
    ):
        assert line in lines
    assert bootstrap.systemd_quote("/a b/%h") == '"/a b/%%h"'


# Values that must reach the daemon unchanged whichever parser reads the file.
TRICKY_ENV = {
    "BRACKETS": "/btrfs/project-[project_id]/.local/share/cocalc/persist",
    "SPACES": "  two  spaces  inside and around ",
    "EQUALS": "a=b==c",
    "DOUBLE": 'say "hi" to $HOME `now` back\\slash',
    "SINGLE": "it's fine",
    "HASH": "#not a comment",
    "QUOTED": '"already quoted"',
    "EMPTY": "",
    "STAR": "cocalc:*",
}


def upstream_parse(text: str) -> dict[str, str]:
    """The daemon's own reading as UPSTREAM.md 13 describes it: KEY=VALUE lines,
    # lines skipped, one pair of surrounding quotes stripped, nothing else."""
    out = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def test_env_file_is_read_the_same_by_sh_and_the_daemons_parser(tmp_path: Path) -> None:
    config = make_config(tmp_path, env={**TRICKY_ENV, "PROJECT_HOST_NAME": "override"})
    text = bootstrap.render_env_file(config)
    path = tmp_path / "project-host.env"
    path.write_text(text)
    parsed = upstream_parse(text)
    # sh (POSIX quoting: single quotes literal, double quotes without escapes) stands in for
    # systemd here; the end-to-end suite compares with systemd's EnvironmentFile= itself
    keys = [*TRICKY_ENV, "PROJECT_HOST_NAME", "PATH", "COCALC_SYNC_PROJECTS"]
    script = f'set -a; . "{path}"; ' + "; ".join(f'printf "%s\\0" "${k}"' for k in keys)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    seen_by_sh = dict(zip(keys, out, strict=True))
    for key, value in TRICKY_ENV.items():
        assert parsed[key] == value, key
        assert seen_by_sh[key] == value, key
    assert parsed["PROJECT_HOST_NAME"] == seen_by_sh["PROJECT_HOST_NAME"] == "override"  # config.env wins
    assert parsed["PATH"].startswith(f"{config.home}/.nvm/versions/node/v{config.node.version}/bin:")
    assert parsed["COCALC_SYNC_PROJECTS"] == seen_by_sh["COCALC_SYNC_PROJECTS"]
    assert parsed["COCALC_SYNC_PROJECTS"].endswith("/btrfs/project-[project_id]/.local/share/cocalc/persist")


def test_env_file_has_the_daemons_keys(tmp_path: Path) -> None:
    mp = str(tmp_path / "btrfs")
    config = make_config(tmp_path, daemon={"region": "us-west1", "public_ip": "203.0.113.9"})
    env = upstream_parse(bootstrap.render_env_file(config))
    root = config.bootstrap_root
    assert env["MASTER_CONAT_SERVER"] == config.conat_urls[0]
    assert (env["PROJECT_HOST_ID"], env["PROJECT_HOST_NAME"], env["PROJECT_HOST_REGION"]) == (
        config.host.id,
        config.host.name,
        "us-west1",
    )
    assert env["PROJECT_HOST_PUBLIC_URL"] == env["PROJECT_HOST_INTERNAL_URL"] == "https://203.0.113.9"
    assert env["PROJECT_HOST_SSH_SERVER"] == "203.0.113.9:2222"
    assert env["COCALC_SSH_SERVER"] == "0.0.0.0:2222"
    assert env["PROJECT_RUNNER_NAME"] == "0" and env["COCALC_FILE_SERVER_MOUNTPOINT"] == mp
    assert env["DATA"] == env["COCALC_DATA"] == f"{mp}/data"
    assert env["COCALC_LITE_SQLITE_FILENAME"] == f"{mp}/data/sqlite.db"
    assert env["COCALC_PROJECT_BUNDLES"] == f"{root}/bundles/project"
    assert env["COCALC_PROJECT_TOOLS"] == env["COCALC_BIN_PATH"] == f"{root}/bundles/tools/current"
    assert env["COCALC_BTRFS_IMAGE_GB"] == "1"
    assert env["TMPDIR"] == env["TMP"] == env["TEMP"] == f"{mp}/data/tmp"
    assert (env["HOST"], env["PORT"], env["COCALC_PROJECT_HOST_HTTPS"]) == ("0.0.0.0", "443", "1")  # noqa: S104
    assert (env["DEBUG"], env["DEBUG_CONSOLE"]) == ("cocalc:*", "yes")
    assert "COCALC_PROJECT_HOST_HTTPS_HOSTNAME" not in env and "COCALC_PROJECT_HOST_SOFTWARE_BASE_URL" not in env
    # the host record's values win over the IP; no TLS: no TLS host name
    config = make_config(
        tmp_path,
        daemon={
            "public_ip": "2001:db8::5",
            "public_url": "https://h.example.org",
            "internal_url": "http://10.1.2.3:9002",
            "https": False,
            "https_hostname": "h.example.org",
            "port": 9002,
            "software_base_url": "https://sw.example.org/software",
        },
    )
    env = upstream_parse(bootstrap.render_env_file(config))
    assert env["PROJECT_HOST_PUBLIC_URL"] == "https://h.example.org"
    assert env["PROJECT_HOST_INTERNAL_URL"] == "http://10.1.2.3:9002"
    assert env["PROJECT_HOST_SSH_SERVER"] == "[2001:db8::5]:2222"
    assert (env["PORT"], env["COCALC_PROJECT_HOST_HTTPS"]) == ("9002", "0")
    assert "COCALC_PROJECT_HOST_HTTPS_HOSTNAME" not in env
    assert env["COCALC_PROJECT_HOST_SOFTWARE_BASE_URL"] == "https://sw.example.org/software"
    # nothing known about the address: no URL keys rather than wrong ones
    env = upstream_parse(bootstrap.render_env_file(make_config(tmp_path)))
    assert "PROJECT_HOST_PUBLIC_URL" not in env and "PROJECT_HOST_SSH_SERVER" not in env


def test_env_value_that_cannot_be_read_the_same_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, env={"BAD": 'it\'s "both"'})
    try:
        bootstrap.render_env_file(config)
    except bootstrap.BootstrapError as e:
        assert "env BAD" in e.message and e.hint
    else:
        raise AssertionError("no error")


def test_grow_helper_is_valid_sh_and_checks_its_argument(tmp_path: Path) -> None:
    grow = tmp_path / "cocalc-grow-btrfs"
    for image in ("/var/lib/cocalc/btrfs.img", None):
        grow.write_text(bootstrap.render_grow_helper("/btrfs", image, "/etc/cocalc/project-host.env"))
        subprocess.run(["sh", "-n", str(grow)], check=True)
        for args, why in ((["lots"], "whole number"), (["1", "2"], "usage")):
            usage = subprocess.run(["sh", str(grow), *args], capture_output=True, text=True)
            assert usage.returncode == 2 and why in usage.stderr, usage.stderr


def test_grow_unit_runs_before_the_daemon(tmp_path: Path) -> None:
    config = make_config(tmp_path, service={"args": ["--label", "a b"]}, daemon={"port": 443})
    grow = bootstrap.render_grow_unit(config).splitlines()
    assert "ExecStart=/usr/local/sbin/cocalc-grow-btrfs" in grow and "Type=oneshot" in grow
    assert f"Before={config.service.unit}.service" in grow
    unit = bootstrap.render_unit(config, "staff").splitlines()
    assert "After=network-online.target cocalc-grow-btrfs.service" in unit
    assert any(line.startswith("ExecStart=") and line.endswith(' --label "a b"') for line in unit)
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in unit  # port 443 as the user
    unit = bootstrap.render_unit(make_config(tmp_path, daemon={"port": 9002}), "staff").splitlines()
    assert not any(line.startswith("AmbientCapabilities") for line in unit)


def test_subordinate_ids_take_the_old_range_or_the_next_free_one() -> None:
    assert bootstrap.subid_entry("", "ubuntu", 1000) == "ubuntu:100000:65536"
    assert bootstrap.subid_entry("ubuntu:100000:65536\n", "ubuntu", 1000) is None  # idempotent
    assert bootstrap.subid_entry("1000:300000:65536\n", "ubuntu", 1000) is None  # by uid too
    taken = "alice:100000:65536\nbob:165536:1000\n"
    entry = bootstrap.subid_entry(taken, "ubuntu", 1000)
    assert entry == "ubuntu:196608:65536"  # the next multiple of 65536 past both
    ranges = bootstrap.subid_ranges(bootstrap.with_subid_entry(taken, entry))
    spans = sorted((s, s + c) for _, s, c in ranges)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no overlap
    assert bootstrap.with_subid_entry("x:1:2", "y:3:4") == "x:1:2\ny:3:4\n"


def test_storage_conf_puts_podman_on_btrfs(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    mp = config.btrfs.mount_point
    run, graph = bootstrap.storage_roots(config, "ubuntu")
    assert (str(run), str(graph)) == (
        f"{mp}/data/containers/rootless/ubuntu/run",
        f"{mp}/data/containers/rootless/ubuntu/storage",
    )
    conf = bootstrap.render_storage_conf(*bootstrap.storage_roots(config, None))
    assert 'driver = "overlay"' in conf and f'graphroot = "{mp}/data/containers/root/storage"' in conf
    assert conf.splitlines()[2:] == [
        "[storage]",
        'driver = "overlay"',
        f'runroot = "{mp}/data/containers/root/run"',
        f'graphroot = "{mp}/data/containers/root/storage"',
    ]


def test_chrony_conf_is_upstreams() -> None:
    conf = bootstrap.render_chrony_conf().splitlines()
    for line in ("pool pool.ntp.org iburst maxsources 4", "makestep 1.0 -1", "rtcsync"):
        assert line in conf


def test_os_release_and_versions(tmp_path: Path) -> None:
    path = tmp_path / "os-release"
    path.write_text('PRETTY_NAME="Ubuntu 24.04.1 LTS"\nID=ubuntu\nVERSION_ID="24.04"\n# comment\n')
    release = bootstrap.read_os_release(str(path))
    assert release["ID"] == "ubuntu" and release["VERSION_ID"] == "24.04"
    assert bootstrap.version_tuple("24.04") == (24, 4)
    assert bootstrap.version_tuple("24.10") > bootstrap.version_tuple("24.4")  # numeric, not text
    assert bootstrap.version_tuple("12") >= bootstrap.version_tuple("12")
    assert bootstrap.version_tuple("11") < bootstrap.version_tuple("12")


CLOUDFLARED = {
    "deb": {
        "url": "http://127.0.0.1:9/cloudflared/2025.1.0/cloudflared-linux-amd64.deb",
        "sha256": "a" * 64,
        "version": "2025.1.0",
    },
    "hostname": "h1.tunnel.example.org",
}


def test_tunnel_switches_the_daemon_to_cloudflareds_port_without_tls(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, cloudflared=CLOUDFLARED, daemon={"port": 443, "https": True, "https_hostname": "x.example.org"}
    )
    env = upstream_parse(bootstrap.render_env_file(config))
    assert (env["PORT"], env["COCALC_PROJECT_HOST_HTTPS"]) == ("9002", "0")
    assert "COCALC_PROJECT_HOST_HTTPS_HOSTNAME" not in env
    assert env["PROJECT_HOST_PUBLIC_URL"] == "https://h1.tunnel.example.org"
    assert not any(
        line.startswith("AmbientCapabilities") for line in bootstrap.render_unit(config, "staff").splitlines()
    )


def test_cloudflared_config_and_unit() -> None:
    conf = bootstrap.render_cloudflared_config("h1.tunnel.example.org", 9002)
    assert conf.splitlines()[1:] == [
        "ingress:",
        "  - hostname: h1.tunnel.example.org",
        "    service: http://localhost:9002",
        "  - service: http_status:404",
    ]
    unit = bootstrap.render_cloudflared_unit().splitlines()
    assert "Restart=always" in unit and "RestartSec=5" in unit
    assert "EnvironmentFile=/etc/cloudflared/token.env" in unit
    exec_line = next(line for line in unit if line.startswith("ExecStart="))
    assert "token" not in exec_line.replace("token.env", "")  # the token is never an argument
    assert bootstrap.TUNNEL_TOKEN_RE.fullmatch("eyJhIjoiYWJjIn0=" + "x" * 20)
    assert not bootstrap.TUNNEL_TOKEN_RE.fullmatch("a b c d e f g h i j k")


def test_tunnel_step_without_a_tunnel_is_satisfied(tmp_path: Path) -> None:
    from test_steps_support import context

    state = bootstrap.TunnelStep(context(make_config(tmp_path))).check()
    assert state.satisfied and "no tunnel" in state.detail


GPU = {
    "repo_url": "https://nvidia.example.org/libnvidia-container/stable/deb/amd64",
    "keyring_url": "https://nvidia.example.org/libnvidia-container/gpgkey.gpg",
    "keyring_sha256": "b" * 64,
    "cdi_interval_s": 120,
}


def test_gpu_step_skips_a_host_without_an_nvidia_gpu_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_steps_support import context

    assert bootstrap.GpuStep(context(make_config(tmp_path))).check().detail == "no GPU configured"
    monkeypatch.setattr(bootstrap, "NVIDIA_DEVICE", tmp_path / "nvidiactl")  # not there, as on this machine
    step = bootstrap.GpuStep(context(make_config(tmp_path, gpu=GPU)))
    state = step.check()
    assert state.satisfied and "no NVIDIA GPU on this host" in state.detail and "nvidiactl is missing" in state.detail
    step.apply()  # changes nothing, says why
    (tmp_path / "nvidiactl").touch()  # a GPU: now there is work to do
    assert not bootstrap.GpuStep(context(make_config(tmp_path, gpu=GPU))).check().satisfied


def test_gpu_files_render_the_repository_keyring_unit_and_timer(tmp_path: Path) -> None:
    from test_steps_support import context

    files = bootstrap.GpuStep(context(make_config(tmp_path, gpu=GPU))).files()
    by_name = {p.name: content for p, (content, _) in files.items()}
    assert by_name["nvidia-container-toolkit.list"].splitlines()[-1] == (
        "deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] "
        "https://nvidia.example.org/libnvidia-container/stable/deb/amd64 /"
    )
    service, timer = by_name["cocalc-nvidia-cdi.service"].splitlines(), by_name["cocalc-nvidia-cdi.timer"].splitlines()
    assert "Type=oneshot" in service and "ExecStart=/usr/local/sbin/cocalc-nvidia-cdi" in service
    assert "OnUnitActiveSec=120s" in timer and "WantedBy=timers.target" in timer
    assert {p: m for p, (_, m) in files.items()}[Path("/usr/local/sbin/cocalc-nvidia-cdi")] == 0o755


def test_cdi_helper_runs_nvidia_ctk_as_upstream_did(tmp_path: Path) -> None:
    """Against a stand-in nvidia-ctk that records its arguments and writes the spec."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "args"
    (bin_dir / "nvidia-ctk").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nout=${{3#--output=}}\necho "cdiVersion: 0.5.0" > "$out"\n'
    )
    (bin_dir / "nvidia-ctk").chmod(0o755)
    spec = tmp_path / "cdi dir" / "nvidia.yaml"
    helper = tmp_path / "cocalc-nvidia-cdi"
    helper.write_text(bootstrap.render_cdi_helper(str(spec)))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["sh", str(helper)], check=True, env=env)
    assert record.read_text().splitlines() == ["cdi", "generate", f"--output={spec}"]
    assert spec.read_text() == "cdiVersion: 0.5.0\n"
    assert (
        bootstrap.render_cdi_helper().splitlines()[-1] == "exec nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"
    )
