"""Steps that install software: apt, bundle downloads and installs, Node.js."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from .apt import APT_ENV, APT_HINT, apt_download, apt_install, apt_quiesced, apt_update, wait_for_locks
from .archive import install_archive, point_symlink
from .commands import CommandError, backoff_delay, run_command
from .config import ArtifactSpec
from .errors import BootstrapError
from .facts import (
    DPKG_LOCKS,
    NODE_ARCH_BY_DPKG,
    apt_lists_age_s,
    dpkg_interrupted,
    file_sha256,
    missing_packages,
    read_text_or,
)
from .fetch import (
    DOWNLOAD_HINT,
    checksum_path,
    download_verified,
    http_get_text,
    parse_sha256_file,
    remove_download,
    verified_download,
)
from .images import image_download, image_installed, install_image, wants_image
from .layout import (
    artifact_archive,
    bundle_installed,
    bundle_version_dir,
    bundles_dir,
    downloads_dir,
    node_dir,
    nvm_dir,
)
from .slots import cpu_slot
from .step import Context, Step, StepState, atomic_write_text, write_user_file


class AptStep(Step):
    """The configured Debian packages: waits for the locks, never kills their holder."""

    name = "apt"
    deps = ("preflight",)
    weight_s = 60.0
    phase = "installing packages"
    hint = APT_HINT

    def quiesce_record(self) -> Path:
        return Path(self.config.bootstrap_dir) / "apt-quiesced.json"

    def update_stamp(self) -> Path:
        return Path(self.config.bootstrap_dir) / "apt-update.stamp"

    def inputs(self) -> Mapping[str, Any]:
        return {"packages": sorted(set(self.config.apt.packages))}

    def check(self) -> StepState:
        if self.quiesce_record().exists():
            return StepState(False, "a killed run left apt's timers stopped or man-db's trigger off")
        if dpkg_interrupted():
            return StepState(False, "dpkg was interrupted (needs dpkg --configure -a)")
        missing = missing_packages(self.config.apt.packages)
        if missing:
            return StepState(False, f"not installed: {' '.join(missing)}")
        return StepState(True, f"all {len(self.config.apt.packages)} packages installed")

    def apply(self) -> None:
        spec = self.config.apt
        with apt_quiesced(self.quiesce_record(), self.log):
            if dpkg_interrupted():
                wait_for_locks(DPKG_LOCKS, time.monotonic() + spec.lock_timeout_s, self.log)
                self.log.warn("dpkg was interrupted earlier; running dpkg --configure -a")
                run_command(
                    ["dpkg", "--force-confold", "--configure", "-a"],
                    sudo=True,
                    env=APT_ENV,
                    timeout_s=1800,
                    hint=APT_HINT,
                )
            missing = missing_packages(spec.packages)
            if not missing:
                self.log.info("every package is installed; skipping apt-get update and install")
                return
            age = apt_lists_age_s(self.update_stamp())
            if age is None or age > spec.lists_max_age_s:
                self.update_lists()
            else:
                self.log.info(f"skipping apt-get update: the lists are {age:.0f}s old (limit {spec.lists_max_age_s}s)")
            self.fetch_first(missing)
            self.install(missing)

    @classmethod
    def link_first(cls, ctx: Context) -> bool:
        """apt has the link first when it is the longest chain: when every bundle is installed from an
        image (a mount). Where a bundle is extracted, its download → extraction chain is the longer
        one (measured at 50 MB/s: holding the link for apt made an archive run 31.9 s → 43.9 s, an
        image run 29.9 s → 21.9 s), so its download must not wait."""
        return all(wants_image(ctx.config, name, spec, ctx.log) for name, spec in ctx.config.artifacts.items())

    def fetch_first(self, packages: list[str]) -> None:
        """When apt has the link first (slots.LinkFirst): fetch the packages, then let the other
        downloads go while dpkg works. A failed fetch only gives the link up: install() retries."""
        link = self.ctx.link
        if link is None or link.holder != self.name or not link.held:
            return
        try:
            apt_download(packages, self.config.apt.lock_timeout_s, self.log)
            self.log.info("apt's packages are fetched; the other downloads may use the link now")
        except CommandError as e:
            self.log.warn(f"apt-get install --download-only failed ({e.message}); installing as usual")
        finally:
            link.release()

    def update_lists(self) -> None:
        apt_update(self.config.apt.lock_timeout_s, self.log)
        # synced: a stamp lost to a power cut would cost the next run another apt-get update
        atomic_write_text(self.update_stamp(), f"{time.time():.0f}\n", 0o644)

    def install(self, packages: list[str]) -> None:
        self.log.info(f"installing {len(packages)} package(s): {' '.join(packages)}")
        for attempt in range(1, 4):
            try:
                apt_install(packages, self.config.apt.lock_timeout_s, self.log)
                return
            except CommandError as e:
                if attempt == 3:
                    raise
                delay = backoff_delay(attempt, 5.0, 60.0)
                self.log.warn(
                    f"apt-get install failed (attempt {attempt}/3): {e.message}; "
                    f"refreshing the lists and retrying in {delay:.0f}s"
                )
                time.sleep(delay)
                self.update_lists()  # stale lists (404, unknown package) are the usual cause


class DownloadBundleStep(Step):
    """One bundle, downloaded and verified (not when that version is installed)."""

    artifact: ClassVar[str]
    deps = ("directories",)
    weight_s = 15.0
    phase = "downloading bundles"
    uses_link = True
    hint = DOWNLOAD_HINT

    @property
    def spec(self) -> ArtifactSpec:
        spec: ArtifactSpec = getattr(self.config.artifacts, self.artifact)
        return spec

    def inputs(self) -> Mapping[str, Any]:
        s = self.spec
        image = dataclasses.asdict(s.image) if s.image else None
        return {"url": s.url, "sha256": s.sha256, "version": s.version, "size_bytes": s.size_bytes, "image": image}

    def check(self) -> StepState:
        s = self.spec
        if bundle_installed(self.config, self.artifact, s) or image_installed(self.config, self.artifact, s):
            return StepState(True, f"{self.artifact} {s.version} is installed; nothing to download")
        if s.image is not None and verified_download(image_download(self.config, self.artifact, s), s.image.sha256):
            return StepState(True, f"{self.artifact} {s.version}'s image is downloaded and verified")
        if verified_download(artifact_archive(self.config, self.artifact, s), s.sha256):
            return StepState(True, f"{self.artifact} {s.version} is downloaded and verified")
        return StepState(False, f"{self.artifact} {s.version} is not downloaded")

    def apply(self) -> None:
        if self.check().satisfied:
            return
        s = self.spec
        self.link_turn()
        if s.image is not None and wants_image(self.config, self.artifact, s, self.log):
            target = image_download(self.config, self.artifact, s)
            download_verified(s.image.url, target, s.image.sha256, log=self.log, size_bytes=s.image.size_bytes)
            return
        download_verified(
            s.url, artifact_archive(self.config, self.artifact, s), s.sha256, log=self.log, size_bytes=s.size_bytes
        )


class DownloadProjectHostStep(DownloadBundleStep):
    name = "download_project_host"
    artifact = "project_host"


class DownloadProjectStep(DownloadBundleStep):
    name = "download_project"
    artifact = "project"


class DownloadToolsStep(DownloadBundleStep):
    name = "download_tools"
    artifact = "tools"


class InstallBundleStep(Step):
    """A verified bundle extracted safely to bundles/<artifact>/<version>; `current` swapped to it."""

    artifact: ClassVar[str]
    weight_s = 5.0
    phase = "installing bundles"
    hint = "The bundle is broken or not what the config expects (see the message); fix the artifact and run again."

    @property
    def spec(self) -> ArtifactSpec:
        spec: ArtifactSpec = getattr(self.config.artifacts, self.artifact)
        return spec

    def current_link(self) -> Path:
        return bundles_dir(self.config) / self.artifact / "current"

    def previous_link(self) -> Path:
        return bundles_dir(self.config) / self.artifact / "previous"

    def inputs(self) -> Mapping[str, Any]:
        s = self.spec
        return {
            "version": s.version,
            "sha256": s.sha256,
            "url": s.url,
            "strip_components": s.strip_components,
            "expected_files": list(s.expected_files),
            "executables": list(s.executables),
            "image": dataclasses.asdict(s.image) if s.image else None,
        }

    def check(self) -> StepState:
        s = self.spec
        how = (
            "a mounted image"
            if image_installed(self.config, self.artifact, s)
            else "an extracted archive"
            if bundle_installed(self.config, self.artifact, s)
            else None
        )
        if how is None:
            return StepState(False, f"{self.artifact} {s.version} is not installed")
        current = read_link(self.current_link())
        if current != s.version:
            return StepState(False, f"current points to {current or 'nothing'}, not {s.version}")
        # the step's message (the hub shows it) says which of the two the host chose
        return StepState(True, f"{self.artifact} {s.version} is installed ({how}) and current")

    def apply(self) -> None:
        s = self.spec
        archive = artifact_archive(self.config, self.artifact, s)
        if s.image is not None and wants_image(self.config, self.artifact, s, self.log):
            if not image_installed(self.config, self.artifact, s):
                install_image(self.config, self.artifact, s, self.log)
        elif not bundle_installed(self.config, self.artifact, s):
            self.install(archive)
        before = read_link(self.current_link())
        if point_symlink(self.current_link(), s.version):
            self.log.info(f"{self.artifact}/current -> {s.version}")
            if before is not None and before != s.version:
                point_symlink(self.previous_link(), before)
            # older versions are pruned by the prune step, once the daemon is healthy on this one
        remove_download(archive)  # installed: the archive is no longer needed

    def install(self, archive: Path) -> None:
        s = self.spec
        if not verified_download(archive, s.sha256):
            raise BootstrapError(
                f"{archive} is missing or unverified", hint="Run the bootstrap again: the download step fetches it."
            )
        recorded = parse_sha256_file(checksum_path(archive).read_text(encoding="utf-8"), archive.name)
        # CPU-heavy from here (hashing, decompressing, writing files): one CPU slot, the biggest archive first
        with cpu_slot(self.ctx.cpu, self.name, archive.stat().st_size):
            actual = file_sha256(archive)  # again: verified before use, not just when downloaded
            if actual != recorded:
                remove_download(archive)
                raise BootstrapError(
                    f"{archive} changed on disk since it was verified",
                    hint="Run the bootstrap again: it downloads it anew.",
                )
            start = time.monotonic()
            install_archive(
                archive,
                bundle_version_dir(self.config, self.artifact, s),
                strip=s.strip_components,
                expected_files=s.expected_files,
                executables=s.executables,
                marker={"artifact": self.artifact, "version": s.version, "url": s.url, "sha256": actual},
            )
        self.log.info(f"installed {self.artifact} {s.version} in {time.monotonic() - start:.1f}s")


def read_link(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


class InstallProjectHostStep(InstallBundleStep):
    name = "install_project_host"
    deps = ("download_project_host",)
    artifact = "project_host"


class InstallProjectStep(InstallBundleStep):
    name = "install_project"
    deps = ("download_project",)
    artifact = "project"


class InstallToolsStep(InstallBundleStep):
    name = "install_tools"
    deps = ("download_tools",)
    artifact = "tools"


class NodeStep(Step):
    """Node.js in nvm's layout, from the configured dist mirror, checked against SHASUMS256.txt."""

    name = "node"
    deps = ("directories",)
    weight_s = 15.0
    uses_link = True
    phase = "installing Node.js"
    hint = (
        "<node.dist_url>/v<version>/SHASUMS256.txt must list node-v<version>-linux-<x64|arm64>.tar.xz; "
        "check the mirror."
    )

    def alias_path(self) -> Path:
        return nvm_dir(self.config) / "alias" / "default"

    def inputs(self) -> Mapping[str, Any]:
        nvm = self.config.node.nvm
        return {
            "version": self.config.node.version,
            "dist_url": self.config.node.dist_url,
            "nvm": dataclasses.asdict(nvm) if nvm else None,
        }

    def installed_version(self) -> str | None:
        node = node_dir(self.config) / "bin" / "node"
        if not os.access(node, os.X_OK):
            return None
        return run_command([str(node), "--version"], check=False, timeout_s=60).output.strip() or None

    def nvm_ok(self) -> bool:
        nvm = self.config.node.nvm
        path = nvm_dir(self.config) / "nvm.sh"
        return nvm is None or (path.is_file() and file_sha256(path) == nvm.sha256)

    def check(self) -> StepState:
        want = f"v{self.config.node.version}"
        problems = []
        found = self.installed_version()
        if found != want:
            problems.append(f"node {want} is not installed (found {found or 'nothing'})")
        if read_text_or(self.alias_path()).strip() != want:
            problems.append(f"nvm's default alias is not {want}")
        if not self.nvm_ok():
            problems.append("nvm.sh is missing or not the pinned one")
        return StepState(not problems, "; ".join(problems) or f"node {want} installed and nvm's default")

    def apply(self) -> None:
        want = f"v{self.config.node.version}"
        if self.installed_version() != want:
            self.install_node()
        if not self.nvm_ok():
            self.install_nvm()
        write_user_file(self.alias_path(), want, 0o644)  # as `nvm alias default` writes it: no newline

    def install_node(self) -> None:
        version = self.config.node.version
        base = f"{self.config.node.dist_url.rstrip('/')}/v{version}"
        name = f"node-v{version}-linux-{NODE_ARCH_BY_DPKG.get(self.config.arch, self.config.arch)}.tar.xz"
        try:
            sha256 = parse_sha256_file(http_get_text(f"{base}/SHASUMS256.txt"), name)
        except ValueError as e:
            raise BootstrapError(f"{base}/SHASUMS256.txt: {e}", hint=self.hint) from None
        archive = downloads_dir(self.config) / name
        if not verified_download(archive, sha256):
            self.link_turn()
            download_verified(f"{base}/{name}", archive, sha256, log=self.log)

        def answers_version(staging: Path) -> None:
            found = run_command([str(staging / "bin" / "node"), "--version"], check=False, timeout_s=60)
            if found.output.strip() != f"v{version}":
                raise BootstrapError(
                    f"{name}: bin/node --version says {found.output.strip()[:100]!r}, not v{version}", hint=self.hint
                )

        with cpu_slot(self.ctx.cpu, self.name, archive.stat().st_size):
            install_archive(
                archive,
                node_dir(self.config),
                strip=1,
                executables=("bin/node",),
                marker={"artifact": "node", "version": version, "sha256": sha256},
                verify=answers_version,
            )
        remove_download(archive)
        self.log.info(f"installed node v{version} into {node_dir(self.config)}")

    def install_nvm(self) -> None:
        nvm = self.config.node.nvm
        assert nvm is not None
        archive = downloads_dir(self.config) / f"nvm-{nvm.version}.sh"
        if not verified_download(archive, nvm.sha256):
            download_verified(nvm.url, archive, nvm.sha256, log=self.log)
        atomic_write_text(nvm_dir(self.config) / "nvm.sh", archive.read_text(encoding="utf-8"), 0o644)
        remove_download(archive)
        self.log.info(f"installed nvm {nvm.version} (sha256 pinned)")
