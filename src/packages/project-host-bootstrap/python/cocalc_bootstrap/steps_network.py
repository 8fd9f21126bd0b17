"""The host's network rules: cloud metadata services serve user-data (the stub
and its bootstrap token) to any process on the VM that asks, so only root may
reach them; project containers and every other user are refused.

The rule is a table of our own (`inet cocalc_metadata`) in a file under
/etc/nftables.d, loaded at boot by our own oneshot unit. Not nftables.service:
Debian's and Ubuntu's stock /etc/nftables.conf starts with `flush ruleset`
(enabling or reloading it would wipe podman's and the provider's rules) and
does not include /etc/nftables.d. The file replaces only our table, atomically,
so loading it again (our unit, or an operator's nftables.conf that includes
/etc/nftables.d/*.nft) is always safe."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .apt import apt_install
from .commands import run_command
from .facts import SYSTEMD_UNIT_DIR, missing_packages, systemctl_state
from .log import Log
from .step import Step, StepState, file_matches, write_root_file
from .steps_platform import remove_installed

NFT = "/usr/sbin/nft"
NFT_PACKAGE = "nftables"
METADATA_TABLE = "cocalc_metadata"
METADATA_NFT_FILE = Path("/etc/nftables.d/cocalc-metadata.nft")
METADATA_UNIT = "cocalc-metadata-block"


def render_metadata_nft(addresses: Sequence[str]) -> str:
    """Only root may reach `addresses`: locally, by socket owner (a rootless
    container's traffic leaves through slirp4netns or pasta, which run as the
    user; root inside a user namespace is still the user here); forwarded
    traffic (rootful containers on a bridge) not at all. Refused with
    admin-prohibited, so a client fails at once with "No route to host"."""
    targets = ", ".join(addresses)
    return "\n".join(
        [
            f"#!{NFT} -f",
            "# Written by bootstrap.py; edits are overwritten. Cloud metadata services serve",
            "# user-data (with the bootstrap token) to any process that asks: only root may reach them.",
            "# Replaces only its own table (declare, delete, define: one atomic transaction).",
            f"table inet {METADATA_TABLE}",
            f"delete table inet {METADATA_TABLE}",
            f"table inet {METADATA_TABLE} {{",
            "  chain output {",
            "    type filter hook output priority filter; policy accept;",
            f"    ip daddr {{ {targets} }} meta skuid != 0 counter reject with icmpx type admin-prohibited",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            f"    ip daddr {{ {targets} }} counter reject with icmpx type admin-prohibited",
            "  }",
            "}",
            "",
        ]
    )


def render_metadata_unit() -> str:
    """Loads the table at boot, before the network and the daemon; again when
    nftables.service reloads (its stock file flushes everything). No ExecStop:
    stopping the unit must not open the way (removing the rule is explicit)."""
    return "\n".join(
        [
            "# Written by bootstrap.py; edits are overwritten.",
            "[Unit]",
            "Description=Keep the cloud metadata service from everything but root (CoCalc)",
            "DefaultDependencies=no",
            "Wants=network-pre.target",
            "Before=network-pre.target shutdown.target",
            "After=local-fs.target nftables.service",
            "ReloadPropagatedFrom=nftables.service",
            "",
            "[Service]",
            "Type=oneshot",
            "RemainAfterExit=yes",
            f"ExecStart={NFT} -f {METADATA_NFT_FILE}",
            f"ExecReload={NFT} -f {METADATA_NFT_FILE}",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def metadata_table_listing() -> str | None:
    """`nft list table inet cocalc_metadata`, or None when there is no such table (or no nft)."""
    if not Path(NFT).exists():
        return None
    found = run_command([NFT, "list", "table", "inet", METADATA_TABLE], sudo=True, check=False, timeout_s=30)
    return found.output if found.returncode == 0 else None


def remove_metadata_block(log: Log) -> list[str]:
    """Take the rule away (a config without it, or deprovision): the unit, the
    file and the live table. Only on a host that has our unit or file, so a
    host that never had the rule never touches the table. What was removed."""
    unit_file = SYSTEMD_UNIT_DIR / f"{METADATA_UNIT}.service"
    if not (unit_file.exists() or METADATA_NFT_FILE.exists()):
        return []
    removed = remove_installed([f"{METADATA_UNIT}.service"], [unit_file, METADATA_NFT_FILE], log)
    if metadata_table_listing() is not None:
        run_command([NFT, "delete", "table", "inet", METADATA_TABLE], sudo=True, timeout_s=30)
        log.info(f"deleted the nftables table inet {METADATA_TABLE}")
        removed.append(f"table inet {METADATA_TABLE}")
    return removed


class MetadataBlockStep(Step):
    """The nftables rule that keeps the cloud metadata service from everything
    but root, persisted (file + enabled unit) and live; removed again when the
    config no longer asks for it."""

    name = "metadata"
    deps = ("apt",)  # nftables
    weight_s = 0.5
    phase = "setting up containers"
    hint = (
        f"See sudo journalctl -u {METADATA_UNIT} -n 50 --no-pager and `sudo nft list table inet {METADATA_TABLE}`; "
        "nft needs the nf_tables kernel module and CAP_NET_ADMIN."
    )

    def unit_path(self) -> Path:
        return SYSTEMD_UNIT_DIR / f"{METADATA_UNIT}.service"

    def inputs(self) -> Mapping[str, Any]:
        block = self.config.metadata_block
        return {"addresses": None if block is None else list(block.addresses)}

    def files(self) -> dict[Path, str]:
        block = self.config.metadata_block
        assert block is not None
        return {METADATA_NFT_FILE: render_metadata_nft(block.addresses), self.unit_path(): render_metadata_unit()}

    def problems(self) -> list[str]:
        block = self.config.metadata_block
        if block is None:
            left = [str(p) for p in (self.unit_path(), METADATA_NFT_FILE) if p.exists()]
            return [f"left over from an earlier config: {', '.join(left)}"] if left else []
        if not Path(NFT).exists():
            return [f"{NFT} is missing (package {NFT_PACKAGE})"]
        problems = [f"{p} is missing or differs" for p, c in self.files().items() if not file_matches(p, c, mode=0o644)]
        unit = f"{METADATA_UNIT}.service"
        if systemctl_state("is-enabled", unit) != "enabled":
            problems.append(f"{unit} is not enabled")
        listing = metadata_table_listing()
        if listing is None:
            problems.append(f"the nftables table inet {METADATA_TABLE} is not loaded")
        else:
            live = set(re.findall(r"(?<![0-9.])[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?![0-9.])", listing))
            problems += [f"{a} is not in the live table" for a in block.addresses if a not in live]
        return problems

    def check(self) -> StepState:
        problems = self.problems()
        if not problems:
            block = self.config.metadata_block
            what = "no metadata rule configured" if block is None else f"only root reaches {', '.join(block.addresses)}"
            return StepState(True, what)
        return StepState(False, "; ".join(problems))

    def apply(self) -> None:
        if self.config.metadata_block is None:
            removed = remove_metadata_block(self.log)
            self.log.info(f"removed the metadata rule: {', '.join(removed)}" if removed else "no metadata rule")
            return
        if missing_packages([NFT_PACKAGE]):
            self.log.info(f"installing {NFT_PACKAGE} (not in apt.packages)")
            apt_install([NFT_PACKAGE], self.config.apt.lock_timeout_s, self.log)
        for path, content in self.files().items():
            if not file_matches(path, content, mode=0o644):
                write_root_file(path, content, mode=0o644)
                self.log.info(f"wrote {path}")
        unit = f"{METADATA_UNIT}.service"
        run_command(["systemctl", "daemon-reload"], sudo=True, timeout_s=120)
        if systemctl_state("is-enabled", unit) != "enabled":
            run_command(["systemctl", "enable", unit], sudo=True, timeout_s=120)
        # restart: a oneshot that already ran only loads the (new) file again this way
        run_command(["systemctl", "restart", unit], sudo=True, timeout_s=120, hint=self.hint)
        self.log.info(f"{unit} loaded inet {METADATA_TABLE}: only root reaches the metadata service")
