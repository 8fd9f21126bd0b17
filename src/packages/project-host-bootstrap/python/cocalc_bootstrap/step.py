"""The Step base class and the file operations steps share."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .commands import run_command
from .config import Config
from .log import Log
from .slots import CpuSlots, LinkFirst

# (steps) one class per step of the flow, each a subclass of Step; the
# tuple STEPS lists them all and is what the plan is built from.


@dataclass(frozen=True)
class StepState:
    """What check() found: satisfied (nothing to do) or not, and why."""

    satisfied: bool
    detail: str


@dataclass
class Context:
    """What every step gets: the validated config and the logger (and, in
    the engine, the CPU slots its CPU-heavy work takes and who has the link
    first; None: no limit)."""

    config: Config
    log: Log
    cpu: CpuSlots | None = None
    link: LinkFirst | None = None


class Step:
    """A unit of the bootstrap: check() reads the real state (read-only);
    apply() runs when check() found work (or the step has no record of a
    successful run), and check() runs again after it: the step succeeds only
    if it is then satisfied. inputs() is fingerprinted into state.json so a
    changed input re-runs the step."""

    name: ClassVar[str]
    deps: ClassVar[tuple[str, ...]] = ()
    weight_s: ClassVar[float] = 1.0  # expected seconds, weights progress percent
    phase: ClassVar[str] = "bootstrapping"
    hint: ClassVar[str] = "See the log for the failing command's output."
    version: ClassVar[int] = 1  # bump when apply() changes meaning: part of the fingerprint
    uses_link: ClassVar[bool] = False  # its downloads wait while apt has the link first (link_turn)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.log = ctx.log

    def inputs(self) -> Mapping[str, Any]:
        return {}

    def check(self) -> StepState:
        """Every step has its own: the engine re-runs it after apply() to
        verify the step did its job (the plan refuses a step without one)."""
        raise NotImplementedError(f"step {self.name} has no check()")

    def apply(self) -> None:
        pass

    @classmethod
    def link_first(cls, ctx: Context) -> bool:
        """Should this step have the link first in this run (slots.LinkFirst)? Only apt says so, and not always."""
        return False

    def link_turn(self) -> None:
        """Before a download: wait while the step with the link first (apt) still fetches (slots.LinkFirst).
        Only for steps that say so (uses_link): the engine counts them to be sure apt always gets a thread."""
        if self.ctx.link is not None and self.uses_link:
            self.ctx.link.turn(self.name)


# -- files owned by root, written through sudo ---------------------------------


def atomic_write_text(path: Path, text: str, mode: int = 0o600, *, durable: bool = True) -> None:
    """temp file in the same directory + fsync + rename + fsync the directory:
    a reader (or a crash) sees the old file or the new one, never half.
    durable=False skips the fsyncs (still atomic for readers and for kills)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_root_file(path: Path, content: str, *, mode: int, owner: str = "root", group: str = "root") -> None:
    """Replace a root-owned file atomically: the content goes to a 0600 temp
    file of ours, `install` copies it beside the target with its final mode
    and owner, `mv` renames it over the target (one filesystem: atomic)."""
    fd, source = tempfile.mkstemp(prefix="cocalc-bootstrap-")
    staged = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        # -m: the stub runs us under umask 077, and the daemon's user must reach
        # the file; mkdir -p never re-modes an existing directory.
        make_root_dirs(path.parent)
        run_command(["install", "-m", f"{mode:04o}", "-o", owner, "-g", group, source, staged], sudo=True, timeout_s=30)
        run_command(["mv", "-f", "-T", staged, str(path)], sudo=True, timeout_s=30)
    except BaseException:
        run_command(["rm", "-f", staged], sudo=True, check=False, timeout_s=30)
        raise
    finally:
        os.unlink(source)


def make_root_dirs(path: Path) -> None:
    """Create path and its missing parents as root, mode 0755 whatever the
    umask (the stub runs us under umask 077); existing ones are left alone."""
    for missing in reversed([p for p in (path, *path.parents) if not p.exists()]):
        run_command(["install", "-d", "-m", "0755", str(missing)], sudo=True, timeout_s=30)


def file_matches(path: Path, content: str, *, mode: int, uid: int | None = None, gid: int | None = None) -> bool:
    """The file exists with exactly this content, mode (and owner)."""
    try:
        st = path.stat()
        same = path.read_text(encoding="utf-8") == content
    except (OSError, UnicodeDecodeError):
        return False
    return (
        same
        and stat.S_IMODE(st.st_mode) == mode
        and (uid is None or st.st_uid == uid)
        and (gid is None or st.st_gid == gid)
    )


def write_user_file(path: Path, content: str, mode: int) -> bool:
    """Atomically write a file of ours when it differs; True when it changed."""
    if file_matches(path, content, mode=mode):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, content, mode)
    return True
