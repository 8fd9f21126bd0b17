"""Safe extraction of bundle archives and atomic installs."""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import json
import lzma
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .commands import MeteredPopen, charge_child, tracked_process
from .config import Config
from .errors import BootstrapError
from .fetch import DOWNLOAD_CHUNK
from .step import atomic_write_text

# -- safe extraction and atomic installs -------------------------------------------

INSTALLED_MARKER = ".bootstrap-installed.json"  # written last into staging: its presence means complete
STAGING_PREFIX = ".staging-"


class UnsafeArchiveError(BootstrapError):
    def __init__(self, archive: Path, member: str, why: str) -> None:
        super().__init__(
            f"{archive.name}: refusing member {member!r}: {why}",
            hint="The archive tries to write outside its directory, contains special files or modes, or "
            "expands beyond the extraction budget; rebuild the bundle with plain files, directories and "
            "links that stay inside it (nothing was installed).",
        )
        self.member = member
        self.why = why


# Per-artifact extraction budget. A real bundle (the project bundle: about
# 1 GiB, 100k entries, xz ratio under 10) fits in it ten times over; a bomb
# (a small .tar.xz of zeros, a GNU sparse member) does not.
EXTRACT_MAX_BYTES = 32 << 30  # total size of the regular files extracted
EXTRACT_MAX_ENTRIES = 1_000_000  # files, directories and links created
EXTRACT_MAX_RATIO = 100.0  # extracted bytes per byte of the archive on disk...
EXTRACT_RATIO_FLOOR = 64 << 20  # ...counted once more than this has been extracted
EXTRACT_HEADER_SLACK = 1 << 20  # stream bytes allowed between accepted members (headers, padding, trailer)
MAX_LINK_HOPS = 40  # as the kernel's ELOOP limit
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4000


@dataclass(frozen=True)
class ExtractBudget:
    max_bytes: int = EXTRACT_MAX_BYTES
    max_entries: int = EXTRACT_MAX_ENTRIES
    max_ratio: float = EXTRACT_MAX_RATIO
    ratio_floor: int = EXTRACT_RATIO_FLOOR


ARCHIVE_MAGIC = ((b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b", "gz"), (b"\x28\xb5\x2f\xfd", "zst"), (b"BZh", "bz2"))


ZSTD_URL_RE = re.compile(r"\.(?:tar\.zst|tar\.zstd|tzst)$")
ZSTD_HINT = (
    "Install zstd on the host before the bootstrap (in its image, or cloud-init's packages: the install "
    "steps do not wait for the apt step), or publish .tar.xz bundles."
)


def decompressor_problems(config: Config) -> list[tuple[str, str]]:
    """Preflight: a bundle published as .tar.zst (without an image to mount instead) needs the zstd
    command, since Python reads zstd only from 3.14 on. (what is wrong, what to do) for each."""
    if shutil.which("zstd") is not None:
        return []
    zstd = [
        name
        for name, spec in config.artifacts.items()
        if spec.image is None and ZSTD_URL_RE.search(urllib.parse.urlsplit(spec.url).path)
    ]
    if not zstd:
        return []
    what = f"artifacts {', '.join(zstd)} {'is' if len(zstd) == 1 else 'are'} .tar.zst and the zstd command is missing"
    return [(what, ZSTD_HINT)]


def archive_compression(path: Path) -> str:
    """'xz', 'gz', 'zst', 'bz2' or '' (plain tar), from the file's magic bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    return next((kind for magic, kind in ARCHIVE_MAGIC if head.startswith(magic)), "")


class BudgetedReader:
    """The decompressed tar stream, read through a limit the extractor raises
    as it accepts members: tarfile never reads (into memory) more than the
    accepted members' data plus EXTRACT_HEADER_SLACK, however large a header
    or trailer claims to be."""

    def __init__(self, raw: IO[bytes], archive: Path, total_limit: int) -> None:
        self.raw = raw
        self.archive = archive
        self.count = 0
        self.limit = EXTRACT_HEADER_SLACK
        self.total_limit = total_limit
        self.after = "(the first header)"

    def allow(self, data_bytes: int, after: str) -> None:
        self.limit = min(self.count + data_bytes + EXTRACT_HEADER_SLACK, self.total_limit)
        self.after = after

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = DOWNLOAD_CHUNK
        data = self.raw.read(max(0, min(n, self.limit - self.count + 1)))
        self.count += len(data)
        if self.count > self.limit:
            raise UnsafeArchiveError(
                self.archive,
                self.after,
                f"more than {EXTRACT_HEADER_SLACK} bytes of headers or padding after it "
                f"(or over {self.total_limit} bytes in all)",
            )
        return data


@contextlib.contextmanager
def open_tar_stream(archive: Path, total_limit: int = EXTRACT_MAX_BYTES) -> Iterator[tuple[tarfile.TarFile, Any]]:
    """The archive as a tar stream (mode "r|") over a BudgetedReader, and the
    reader. xz and zstd go through their command-line tools when present
    (`xz -T0` is much faster than Python's lzma); zstd has no Python fallback
    before 3.14. The stream is read to its end, so a damaged archive fails."""
    kind = archive_compression(archive)
    tool = {"xz": ["xz", "-T0", "-dc"], "zst": ["zstd", "-dc"]}.get(kind)
    if tool is None or shutil.which(tool[0]) is None:
        if kind == "zst":
            raise BootstrapError(
                f"{archive.name} is zstd-compressed and zstd is not installed",
                hint=ZSTD_HINT,
            )
        with open_decompressed(archive, kind) as raw:
            reader = BudgetedReader(raw, archive, total_limit)
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                    yield tar, reader
                reader.allow(0, "(the end of the archive)")
                while reader.read(DOWNLOAD_CHUNK):  # the padding after the end marker; checks the stream
                    pass
            except (lzma.LZMAError, EOFError, OSError, zlib.error) as e:
                if isinstance(e, OSError) and e.errno is not None:
                    raise
                raise BootstrapError(
                    f"could not decompress {archive.name}: {e}", hint="The archive is damaged; delete it and run again."
                ) from None
        return
    with tempfile.TemporaryFile() as errors:
        # Streaming, so not run_command: the tar reader consumes stdout as it comes.
        proc = MeteredPopen(
            [*tool, "--", str(archive)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors
        )
        assert proc.stdout is not None
        reader = BudgetedReader(proc.stdout, archive, total_limit)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                yield tar, reader
            reader.allow(0, "(the end of the archive)")
            while reader.read(DOWNLOAD_CHUNK):  # the padding after the tar's end marker
                pass
            returncode = proc.wait(timeout=60)
            charge_child(proc.rusage)
        except BaseException:
            proc.kill()  # we stopped reading early (a refused member, an interrupt)
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        if returncode != 0:
            errors.seek(0)
            message = errors.read().decode("utf-8", "replace").strip()
            raise BootstrapError(
                f"{tool[0]} could not decompress {archive.name} (exit {returncode}): {message}",
                hint="The archive is damaged; delete it and run again.",
            )


def open_decompressed(archive: Path, kind: str) -> Any:  # a binary file object
    if kind == "xz":
        return lzma.open(archive)
    if kind == "gz":
        return gzip.open(archive)
    if kind == "bz2":
        return bz2.open(archive)
    return open(archive, "rb")


def member_parts(name: str, strip: int) -> list[str] | None:
    """The path components of a member after stripping, [] for the root,
    None when stripped away. Raises ValueError for absolute paths and `..`."""
    if name.startswith("/"):
        raise ValueError("absolute path")
    # GNU tar counts "." as a component when stripping (upstream's project-host bundle holds
    # ./cocalc-project-host-<v>-<arch>-<os>/..., unpacked with strip 2) and skips empty ones.
    counted = [p for p in name.split("/") if p != ""]
    if ".." in counted:
        raise ValueError("'..' in the path")
    if any(len(os.fsencode(p)) > MAX_NAME_BYTES for p in counted) or len(os.fsencode(name)) > MAX_PATH_BYTES:
        raise ValueError("name too long")
    return [p for p in counted[strip:] if p != "."] if len(counted) >= strip else None


def link_stays_inside(depth: int, linkname: str) -> bool:
    """A symlink's target, read from a real directory `depth` levels below
    the root, is relative, climbs only at its start and not above the root;
    later components only descend, so the link stays inside however other
    (equally checked) links resolve and whatever later members replace."""
    if not linkname or linkname.startswith("/"):
        return False
    parts = [p for p in linkname.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    return ".." not in parts[ups:] and ups <= depth


class LeavesRoot(Exception):
    pass


def resolve_dir(root: str, parts: Sequence[str]) -> tuple[list[str], int]:
    """Resolve the directory parts below root as the kernel would, but against
    root and refusing (LeavesRoot) what leaves it: every symlink on the way is
    read and followed (chains too, at most MAX_LINK_HOPS), `..` never climbs
    above root, absolute link targets are refused, and every component that
    exists must be a directory. Returns the real path's parts (no symlink
    among them) and how many of them exist: the missing ones are at the end."""
    todo = list(reversed(parts))
    resolved: list[str] = []
    hops = 0
    existing: int | None = None  # set when a component is missing
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if existing is not None:
            if part == "..":
                raise LeavesRoot("'..' after a directory that does not exist")
            resolved.append(part)
            continue
        if part == "..":
            if not resolved:
                raise LeavesRoot("climbs above the bundle's root")
            resolved.pop()
            continue
        path = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            existing = len(resolved)
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise LeavesRoot("too many levels of links")
            target = os.readlink(path)
            if target.startswith("/"):
                raise LeavesRoot(f"goes through the link {'/'.join([*resolved, part])!r} to an absolute path")
            todo.extend(reversed(target.split("/")))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise LeavesRoot(f"goes through {'/'.join([*resolved, part])!r}, which is not a directory")
        resolved.append(part)
    return resolved, len(resolved) if existing is None else existing


def mode_problem(member: tarfile.TarInfo) -> str | None:
    mode = member.mode
    if mode & (stat.S_ISUID | stat.S_ISGID):
        return f"setuid/setgid mode {mode:04o} is not allowed"
    if mode & stat.S_ISVTX:
        return f"sticky mode {mode:04o} is not allowed"
    if mode & stat.S_IWOTH:
        return f"world-writable mode {mode:04o} is not allowed"
    return None


class Extraction:
    """One archive into one (new) directory: every member is checked against
    what is already extracted before anything is created for it."""

    def __init__(self, archive: Path, dest: Path, strip: int, budget: ExtractBudget) -> None:
        self.archive = archive
        self.root = str(dest)
        self.strip = strip
        self.budget = budget
        self.compressed = archive.stat().st_size
        self.bytes = 0
        self.entries = 0

    def refuse(self, member: tarfile.TarInfo, why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(self.archive, member.name, why)

    def resolve(self, member: tarfile.TarInfo, parts: Sequence[str], what: str) -> tuple[list[str], int]:
        try:
            return resolve_dir(self.root, parts)
        except LeavesRoot as e:
            raise self.refuse(member, f"{what} {e}") from None

    def path(self, parts: Sequence[str]) -> str:
        return os.path.join(self.root, *parts)

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo, reader: BudgetedReader) -> bool:
        """Check one member, then create it; False when it creates nothing."""
        try:
            parts = member_parts(member.name, self.strip)
        except ValueError as e:
            raise self.refuse(member, str(e)) from None
        if parts is None or (not parts and member.isdir()):
            if member.isreg():  # not written, but decompressed all the same
                self.check_bytes(member)
                self.bytes += member.size
            reader.allow(member.size if member.isreg() else 0, member.name)
            return False
        if not parts:
            raise self.refuse(member, "a non-directory at the bundle root")
        if not (member.isdir() or member.isreg() or member.issym() or member.islnk()):
            raise self.refuse(member, "devices, fifos and other special files are not allowed")
        if member.isdir() or member.isreg():
            problem = mode_problem(member)
            if problem:
                raise self.refuse(member, problem)
        parent, existing = self.resolve(member, parts[:-1], "its directory")
        new_dirs = len(parent) - existing
        target = [*parent, parts[-1]]
        try:
            st: os.stat_result | None = os.lstat(self.path(target)) if new_dirs == 0 else None
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            if member.isdir():
                reader.allow(0, member.name)
                return False
            raise self.refuse(member, "replaces a directory")
        source: list[str] | None = None
        if member.issym() and not link_stays_inside(len(parent), member.linkname):
            raise self.refuse(member, f"symlink to {member.linkname!r} leads outside")
        if member.islnk():
            source = self.hard_link_source(member, parent, target)
            if source == target:  # tar(1) records a file added twice as a hard link to itself
                reader.allow(0, member.name)
                return False
        if self.entries + 1 + new_dirs > self.budget.max_entries:
            raise self.refuse(member, f"more than {self.budget.max_entries} entries (the extraction budget)")
        if member.isreg():
            self.check_bytes(member)
        # accepted: now, and only now, create it
        for i in range(existing, len(parent)):
            os.mkdir(self.path(parent[: i + 1]), 0o755)
        self.entries += new_dirs + 1
        if st is not None:
            os.unlink(self.path(target))  # a duplicate entry: the later one wins, as with tar(1)
        reader.allow(member.size if member.isreg() else 0, member.name)
        path = self.path(target)
        if member.isdir():
            os.mkdir(path, (member.mode & 0o777) | 0o700)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif source is not None:
            os.link(self.path(source), path, follow_symlinks=False)
        else:
            self.write_file(tar, member, path)
        return True

    def hard_link_source(self, member: tarfile.TarInfo, parent: Sequence[str], target: Sequence[str]) -> list[str]:
        try:
            parts = member_parts(member.linkname, self.strip)
        except ValueError as e:
            raise self.refuse(member, f"hard link target {member.linkname!r}: {e}") from None
        if not parts:
            raise self.refuse(member, f"hard link to {member.linkname!r}, which is not in the bundle")
        source_dir, existing = self.resolve(member, parts[:-1], "its hard link target's directory")
        source = [*source_dir, parts[-1]]
        try:
            st = os.lstat(self.path(source)) if existing == len(source_dir) else None
        except FileNotFoundError:
            st = None
        if st is None:
            raise self.refuse(member, f"hard link to {member.linkname!r}, which is not extracted before it")
        if stat.S_ISLNK(st.st_mode):
            # a hard link to a symlink is a copy of that link in another directory: check it there
            if not link_stays_inside(len(parent), os.readlink(self.path(source))):
                raise self.refuse(member, f"hard link to the symlink {member.linkname!r} leads outside from here")
        elif not stat.S_ISREG(st.st_mode):
            raise self.refuse(member, f"hard link to {member.linkname!r}, which is not a file")
        return source

    def check_bytes(self, member: tarfile.TarInfo) -> None:
        total = self.bytes + member.size
        b = self.budget
        if total > b.max_bytes:
            raise self.refuse(member, f"{total} bytes in all: more than the extraction budget of {b.max_bytes} bytes")
        if total > b.ratio_floor and total > b.max_ratio * self.compressed:
            raise self.refuse(
                member,
                f"expands {self.compressed} bytes of archive to {total} bytes: "
                f"a ratio over the extraction budget of {b.max_ratio:g}",
            )

    def write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        fileobj = tar.extractfile(member)
        assert fileobj is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        written = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := fileobj.read(DOWNLOAD_CHUNK):
                written += len(chunk)
                if written > member.size:
                    raise self.refuse(member, "more data than its header says")
                out.write(chunk)
        self.bytes += written
        os.chmod(path, member.mode & 0o777)
        os.utime(path, (member.mtime, member.mtime))


def extract_safely(archive: Path, dest: Path, *, strip: int = 0, budget: ExtractBudget | None = None) -> int:
    """Extract into the (new, empty) directory dest: regular files, directories,
    and links that stay inside, within the budget; anything else refuses the
    whole archive (UnsafeArchiveError naming the member), and a refused member
    creates nothing. Returns the number of members extracted."""
    budget = budget or ExtractBudget()
    extraction = Extraction(archive, dest, strip, budget)
    count = 0
    try:
        with open_tar_stream(archive, budget.max_bytes + budget.max_entries * 4096) as (tar, reader):
            for member in tar:
                if extraction.member(tar, member, reader):
                    count += 1
    except tarfile.TarError as e:  # a truncated or garbled stream (not a refusal: those are checked)
        raise BootstrapError(
            f"could not read {archive.name} as a tar archive: {e}",
            hint="The archive is damaged; delete it and run again.",
        ) from None
    return count


# -- extraction in a worker process -------------------------------------------------
#
# Installs run as threads of one process; extracting in them would serialise
# on the interpreter lock (tarfile's parsing, the checks, the writes' Python
# side). So each extraction runs in its own process: bootstrap.py itself,
# imported by a fresh `python3 -I` (importing it does nothing), running the
# very same extract_safely: every check of the hostile-input work is the one
# code path, only its process differs. The request goes in on stdin and the
# outcome comes back as one JSON line on stdout; an error is rebuilt in the
# parent as the same exception with the same message (UnsafeArchiveError,
# BootstrapError, OSError), so a step says what it said in-process.

WORKER_HINT = "The extraction worker (python3 running bootstrap.py) died; see its output above and run again."


def worker_argv() -> list[str]:
    """python3 importing this very code: the built bootstrap.py, or (in development) the package."""
    package = __spec__.parent if __spec__ is not None else ""
    if package:
        root = str(Path(__file__).resolve().parents[1])
        code = (
            f"import sys; sys.path.insert(0, {root!r}); "
            f"from {package}.archive import extract_worker_main; sys.exit(extract_worker_main())"
        )
    else:
        code = (
            "import importlib.util as u, sys; s = u.spec_from_file_location('cocalc_bootstrap_worker', "
            f"{str(Path(__file__).resolve())!r}); m = sys.modules[s.name] = u.module_from_spec(s); "
            "s.loader.exec_module(m); "
            "sys.exit(m.extract_worker_main())"
        )
    return [sys.executable or "python3", "-I", "-c", code]


def extract_worker_main() -> int:
    """The worker: one request on stdin, one JSON outcome on stdout."""
    request = json.loads(sys.stdin.read())
    archive = Path(request["archive"])
    try:
        count = extract_safely(
            archive, Path(request["dest"]), strip=int(request["strip"]), budget=ExtractBudget(**request["budget"])
        )
        outcome: dict[str, Any] = {"ok": True, "count": count}
    except UnsafeArchiveError as e:
        outcome = {"kind": "unsafe", "member": e.member, "why": e.why}
    except BootstrapError as e:
        outcome = {"kind": "bootstrap", "message": e.message, "hint": e.hint, "log_tail": e.log_tail}
    except OSError as e:
        outcome = {"kind": "os", "errno": e.errno, "strerror": e.strerror, "filename": e.filename, "text": str(e)}
    except Exception as e:  # a bug: still one clear message
        outcome = {"kind": "other", "text": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(outcome) + "\n")
    sys.stdout.flush()
    return 0


def worker_error(archive: Path, outcome: Mapping[str, Any]) -> BaseException:
    kind = outcome.get("kind")
    if kind == "unsafe":
        return UnsafeArchiveError(archive, str(outcome["member"]), str(outcome["why"]))
    if kind == "bootstrap":
        return BootstrapError(str(outcome["message"]), hint=outcome.get("hint"), log_tail=outcome.get("log_tail"))
    if kind == "os" and outcome.get("errno") is not None:
        return OSError(outcome["errno"], outcome.get("strerror") or "", outcome.get("filename"))
    text = str(outcome.get("text", outcome))
    return BootstrapError(
        f"extracting {archive.name} failed: {text}",
        hint="An unexpected error in bootstrap.py's extraction (a bug); nothing was installed.",
    )


def extract_in_worker(archive: Path, dest: Path, *, strip: int = 0, budget: ExtractBudget | None = None) -> int:
    """extract_safely in a separate python3 process (outside this one's
    interpreter lock); same result, same errors. Interrupting the caller
    kills the worker (it is a tracked process group, like any command)."""
    request = {
        "archive": str(archive),
        "dest": str(dest),
        "strip": strip,
        "budget": dataclasses.asdict(budget or ExtractBudget()),
    }
    with tempfile.TemporaryFile() as errors:
        proc = MeteredPopen(
            worker_argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
        )
        with tracked_process(proc.pid):
            try:
                out, _ = proc.communicate(json.dumps(request).encode())
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        charge_child(proc.rusage)  # the worker's CPU-seconds count to the installing step
        lines = out.decode("utf-8", "replace").strip().splitlines()
        try:
            outcome = json.loads(lines[-1]) if lines else None
        except ValueError:
            outcome = None
        if not isinstance(outcome, dict):
            errors.seek(0)
            said = errors.read().decode("utf-8", "replace").strip()[-2000:]
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            raise BootstrapError(
                f"extracting {archive.name} failed: the worker ended ({how}) without an answer",
                hint=WORKER_HINT,
                log_tail=said or None,
            )
    if outcome.get("ok") is True:
        return int(outcome["count"])
    raise worker_error(archive, outcome)


def bundle_problems(root: Path, expected_files: Sequence[str], executables: Sequence[str]) -> list[str]:
    problems = [f"{name} is missing" for name in expected_files if not (root / name).exists()]
    for name in executables:
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif not os.access(path, os.X_OK):
            problems.append(f"{name} is not executable")
    return problems


def read_marker(version_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((version_dir / INSTALLED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def install_archive(
    archive: Path,
    final: Path,
    *,
    strip: int,
    expected_files: Sequence[str] = (),
    executables: Sequence[str] = (),
    marker: Mapping[str, Any],
    verify: Callable[[Path], None] | None = None,
    budget: ExtractBudget | None = None,
    in_process: bool = False,
) -> None:
    """Extract into `<parent>/.staging-<name>-<random>`, check it, mark it
    complete, and rename it to `final` in one step. A failure anywhere leaves
    `final` untouched (or absent) and no staging directory behind."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_staging_dirs(parent)
    staging = parent / f"{STAGING_PREFIX}{final.name}-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o755)
    try:
        (extract_safely if in_process else extract_in_worker)(archive, staging, strip=strip, budget=budget)
        problems = bundle_problems(staging, expected_files, executables)
        if problems:
            raise BootstrapError(
                f"{archive.name} is incomplete: {'; '.join(problems)}",
                hint="The bundle does not have the files the config expects; check the artifact and the "
                "config's expected_files, executables and strip_components.",
            )
        if verify is not None:
            verify(staging)
        # The extracted files reach the disk before the marker that says they are complete: after
        # a power cut a marker never vouches for files that came back empty (the daemon would not
        # start, and no check would see why). One sync(2) for the whole tree.
        os.sync()
        atomic_write_text(staging / INSTALLED_MARKER, json.dumps(dict(marker), indent=2, sort_keys=True) + "\n", 0o644)
        if os.path.lexists(final):  # an older attempt not made by us, or without a marker: set it aside
            final.rename(parent / f"{STAGING_PREFIX}{final.name}-old-{secrets.token_hex(4)}")
        staging.rename(final)
        fsync_dir(parent)  # the rename too: else a power cut brings back staging (removed) and costs a re-install
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    remove_staging_dirs(parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_staging_dirs(parent: Path) -> None:
    """Leftovers of a killed run: never used, always removed."""
    with contextlib.suppress(FileNotFoundError):
        for entry in parent.iterdir():
            if entry.name.startswith(STAGING_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)


def point_symlink(link: Path, target: str) -> bool:
    """Make `link` a symlink to `target` atomically (new link + rename); True when it changed."""
    with contextlib.suppress(OSError):
        if os.readlink(link) == target:
            return False
    temp = link.with_name(f".{link.name}-{secrets.token_hex(4)}")
    os.symlink(target, temp)
    try:
        os.replace(temp, link)
    except BaseException:
        temp.unlink()
        raise
    return True
