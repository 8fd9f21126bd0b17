"""Property-based tests (hypothesis) of extraction and of event text (issue 12).

Generated archives mix link chains, hard links to links, duplicates, odd
modes, devices, fifos, pax-sparse and oversized members, names that collide
on purpose (a four-letter alphabet), against these invariants:

- nothing outside the staging directory is created, changed or linked to;
- the archive is refused (UnsafeArchiveError, nothing else) or complete;
- a refused member created nothing: the tree equals the tree of the archive
  cut just before that member;
- what is extracted has no special file, no setuid/setgid/sticky/world-
  writable mode, and every link resolves inside.

Bounded for CI: HYPOTHESIS_PROFILE=ci (the default, 200 archives, about 30 s);
HYPOTHESIS_PROFILE=long for a longer run (see the package README). The seed
is printed on failure, and HYPOTHESIS_SEED=<n> replays it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bootstrap
from hypothesis import HealthCheck, event, given, note, seed, settings
from hypothesis import strategies as st

settings.register_profile(
    "ci", max_examples=200, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=5000, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
SEED = int(os.environ.get("HYPOTHESIS_SEED") or random.SystemRandom().randrange(1 << 32))
BUDGET = bootstrap.ExtractBudget(max_bytes=6000, max_entries=24, max_ratio=1e9, ratio_floor=0)


@contextmanager
def seed_printed(items: list[Any] | None = None) -> Iterator[None]:
    try:
        yield
    except BaseException:
        # note(): printed once, with hypothesis' report of the shrunk failing example
        note(f"fuzz seed: {SEED} (replay: HYPOTHESIS_SEED={SEED} bash scripts/pytest.sh -k fuzz)")
        for item in items or []:
            info, data = item if isinstance(item, tuple) else (item, b"")
            kind = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link"}.get(
                info.type, "file" if info.isreg() else f"type {info.type!r}"
            )
            extra = f" -> {info.linkname!r}" if info.linkname else f" {len(data)} bytes"
            note(f"  {info.name!r}: {kind} mode {info.mode:04o}{extra} {info.pax_headers or ''}")
        raise


# -- generated members --------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d"])
ODD = st.sampled_from(["..", ".", "", "top", "/"])
MODES = st.sampled_from([0o600, 0o700, 0o444, 0o000, 0o4755, 0o2755, 0o1777, 0o777, 0o666, 0o1755, 0o646, 0o757])


@st.composite
def paths(draw: Callable[..., Any], *, odd: bool = True) -> str:
    parts = draw(st.lists(st.one_of(NAMES, ODD) if odd and draw(st.booleans()) else NAMES, min_size=1, max_size=4))
    return "/".join(parts)


@st.composite
def member_names(draw: Callable[..., Any]) -> str:
    rest = draw(paths(odd=rare(draw, 25)))
    return rest if rare(draw, 40) else f"top/{rest}"


@st.composite
def link_targets(draw: Callable[..., Any]) -> str:
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return str(draw(st.sampled_from(["/etc", "/", "../outdir", "../../outdir", "../../box/sentinel", ""])))
    ups = draw(st.integers(0, 3))
    return "/".join([".."] * ups + [str(draw(paths()))])


def rare(draw: Callable[..., Any], one_in: int) -> bool:
    # the middle value: hypothesis favours the ends of a range
    return bool(draw(st.integers(0, one_in - 1)) == one_in // 2)


@st.composite
def members(
    draw: Callable[..., Any], earlier: list[tuple[str, str]]
) -> tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]:
    """One member, built to get past most checks so that the interesting ones
    are reached: names below earlier directories and links (so writes go
    through link chains), links whose climb is at most one level more than
    their depth, hard links to earlier files and symlinks; odd names, modes,
    targets and special files are rare."""
    kind = draw(st.sampled_from(["file", "file", "dir", "dir", "sym", "sym", "sym", "hard", "hard", "sparse", "big"]))
    if rare(draw, 30):
        kind = "dev"
    if kind == "hard" and not any(k in ("file", "sym", "hard") for _, k in earlier) and not rare(draw, 8):
        kind = "file"  # mostly a hard link to something that is there
    name = draw(member_names())
    below = [n for n, k in earlier if k in ("dir", "sym")]
    if below and not rare(draw, 3) and (kind != "hard" or rare(draw, 2)):  # hard links: often shallow
        name = draw(st.sampled_from(below)) + "/" + draw(paths(odd=False))
    elif earlier and rare(draw, 8):
        name = draw(st.sampled_from(earlier))[0]  # a duplicate: the later one replaces it
    info = tarfile.TarInfo(name)
    info.mode = draw(MODES) if rare(draw, 5) else (0o755 if kind == "dir" else 0o644)
    if kind in ("file", "big"):
        data = draw(st.binary(max_size=64)) if kind == "file" else bytes(draw(st.integers(1000, 7000)))
        info.size = len(data)
        return info, data
    if kind == "sparse":
        data = draw(st.binary(min_size=1, max_size=32))
        info.size = len(data)
        real = draw(st.integers(len(data), 9000))
        info.pax_headers = {"GNU.sparse.map": f"0,{len(data)}", "GNU.sparse.size": str(real)}
        return info, data
    if kind == "dir":
        info.type = tarfile.DIRTYPE
    elif kind == "sym":
        info.type = tarfile.SYMTYPE
        depth = max(0, len([p for p in name.split("/") if p]) - 2)  # below top/, the link's directory
        if rare(draw, 10):
            info.linkname = draw(link_targets())
        else:
            rest = draw(st.sampled_from(earlier))[0].split("/")[1:] if earlier and draw(st.booleans()) else []
            rest = rest or draw(paths(odd=False)).split("/")
            if rare(draw, 4):  # `..` after a name (`a/../..`): refused, however it would resolve
                rest[1:1] = [".."] * draw(st.integers(1, 3))
            info.linkname = "/".join([".."] * draw(st.integers(0, depth + 1)) + rest)
    elif kind == "hard":
        info.type = tarfile.LNKTYPE
        sources = [n for n, k in earlier if k in ("file", "sym", "hard")]
        links = [n for n, k in earlier if k == "sym"]
        if links and draw(st.booleans()):  # a hard link to a symlink, often higher up than the symlink
            info.linkname = draw(st.sampled_from(links))
            if draw(st.booleans()):
                info.name = f"top/{draw(NAMES)}{draw(NAMES)}"
        elif sources and not rare(draw, 8):
            info.linkname = draw(st.sampled_from(sources))
        else:
            info.linkname = draw(member_names())
    else:
        info.type = draw(st.sampled_from([tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE]))
    return info


@st.composite
def archives(draw: Callable[..., Any]) -> list[Any]:
    items: list[Any] = []
    earlier: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(1, 12))):
        item = draw(members(earlier))
        items.append(item)
        info = item[0] if isinstance(item, tuple) else item
        kind = {tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "sym", tarfile.LNKTYPE: "hard"}.get(info.type, "file")
        earlier.append((info.name, kind))
    return items


def archive_bytes(items: list[Any]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in items:
            info, data = item if isinstance(item, tuple) else (item, b"")
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


# -- the invariants ------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below root: type, mode, link target or content hash, and
    which entries share an inode (as the first path of that inode)."""
    found: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st_ = path.lstat()
            first = inodes.setdefault(st_.st_ino, rel) if not stat.S_ISDIR(st_.st_mode) else rel
            if stat.S_ISLNK(st_.st_mode):
                found[rel] = ("link", os.readlink(path), first)
            elif stat.S_ISDIR(st_.st_mode):
                found[rel] = ("dir", stat.S_IMODE(st_.st_mode))
            else:
                found[rel] = ("file", stat.S_IMODE(st_.st_mode), hashlib.sha256(path.read_bytes()).hexdigest(), first)
    return dict(sorted(found.items()))


def outside_state(box: Path) -> Any:
    sentinel = box / "sentinel"
    return (sorted(os.listdir(box)), os.listdir(box / "outdir"), sentinel.read_bytes(), sentinel.stat().st_nlink)


def fresh_box(tmp: Path, name: str) -> tuple[Path, Path]:
    box = tmp / name
    shutil.rmtree(box, ignore_errors=True)
    (box / "dest").mkdir(parents=True)
    (box / "outdir").mkdir()
    (box / "sentinel").write_bytes(b"untouched")
    return box, box / "dest"


def extract(tmp: Path, name: str, items: list[Any]) -> tuple[Path, Path, BaseException | None]:
    box, dest = fresh_box(tmp, name)
    archive = tmp / f"{name}.tar"
    archive.write_bytes(archive_bytes(items))
    try:
        bootstrap.extract_safely(archive, dest, strip=1, budget=BUDGET)
    except bootstrap.UnsafeArchiveError as e:
        return box, dest, e
    return box, dest, None


def link_destination(path: Path) -> str | None:
    """Where a symlink leads, as the kernel would resolve it; None for a loop
    (ELOOP). Not os.path.realpath alone: without strict it answers "/" for a
    loop such as a/a -> ../a/a//, which hypothesis found (seed 1129673002)."""
    try:
        return os.path.realpath(path, strict=True)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        return os.path.realpath(path)  # dangling: where it points


def check_extracted_tree(dest: Path) -> None:
    real_dest = os.path.realpath(dest)
    names_per_inode: dict[int, int] = {}
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = path.lstat()
            if stat.S_ISLNK(st_.st_mode):
                real = link_destination(path)
                if real is None:  # a symlink loop resolves to nothing: it cannot lead anywhere
                    continue
                assert real == real_dest or real.startswith(real_dest + "/"), f"{path} -> {real} leaves"
                continue
            assert stat.S_ISDIR(st_.st_mode) or stat.S_ISREG(st_.st_mode), f"{path}: special file"
            assert not st_.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWOTH), f"{path}: mode"
            if stat.S_ISREG(st_.st_mode):
                names_per_inode[st_.st_ino] = names_per_inode.get(st_.st_ino, 0) + 1
    for dirpath, _, filenames in os.walk(dest):
        for name in filenames:
            st_ = (Path(dirpath) / name).lstat()
            if stat.S_ISREG(st_.st_mode):
                assert st_.st_nlink == names_per_inode[st_.st_ino], f"{name}: hard-linked to something outside"


def simple_files(items: list[Any]) -> dict[str, bytes]:
    """Regular files whose extracted place is certain: a unique name, no
    other member at or below any of its parent directories, and only plain
    names in the archive (no `.`, `..` or empty components anywhere)."""
    infos = [i[0] if isinstance(i, tuple) else i for i in items]
    names = [i.name for i in infos]
    not_dirs = {i.name for i in infos if not i.isdir()}
    if any(p in ("", ".", "..") for n in names for p in n.split("/")):
        return {}
    out: dict[str, bytes] = {}
    for item in items:
        if not isinstance(item, tuple) or "GNU.sparse.map" in item[0].pax_headers:
            continue
        info, data = item
        parts = info.name.split("/")
        if parts[0] != "top" or len(parts) < 2 or names.count(info.name) != 1:
            continue
        parents = ["/".join(parts[:k]) for k in range(2, len(parts))]
        if not any(p in not_dirs for p in parents) and not any(n.startswith(info.name + "/") for n in names):
            out["/".join(parts[1:])] = data
    return out


@seed(SEED)
@given(archives())
def test_generated_archives_keep_the_extraction_invariants(tmp_path_factory: Any, items: list[Any]) -> None:
    with seed_printed(items):
        tmp = tmp_path_factory.mktemp("fuzz")
        box, dest, refused = extract(tmp, "full", items)
        assert outside_state(box) == (["dest", "outdir", "sentinel"], [], b"untouched", 1)
        check_extracted_tree(dest)
        event(
            "refused: " + refused.why.split(":")[0][:40] if isinstance(refused, bootstrap.UnsafeArchiveError) else "ok"
        )
        if refused is None:
            for rel, data in simple_files(items).items():
                assert (dest / rel).read_bytes() == data, rel
            return
        # the refused member is the first whose prefix fails; the tree is that of the members before it
        cut = next(k for k in range(1, len(items) + 1) if extract(tmp, "prefix", items[:k])[2] is not None)
        _, before, error = extract(tmp, "prefix", items[: cut - 1])
        assert error is None
        assert snapshot(dest) == snapshot(before), f"refused at member {cut - 1}: {refused}"


ANY_CHARS = st.characters(codec=None, categories=["L", "M", "N", "P", "S", "Z", "C"])  # C: NUL, surrogates


@seed(SEED)
@given(
    st.recursive(
        st.text(ANY_CHARS, max_size=20),
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(st.text(ANY_CHARS, max_size=5), children, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_event_text_is_always_storable_as_postgresql_text(value: Any) -> None:
    """Whatever a step's output holds, what the sender posts is valid UTF-8
    JSON without NUL once parsed (what PostgreSQL text and jsonb take), and
    a value that was already storable is sent unchanged."""
    with seed_printed():
        sent = {"type": "progress", "message": value}
        clean = bootstrap.sendable(sent)
        stored = json.loads(json.dumps(clean))  # what the hub parses and stores
        assert all(storable(text) for text in strings(stored))
        event("storable" if all(storable(text) for text in strings(sent)) else "cleaned")
        if all(storable(text) for text in strings(sent)):
            assert clean == sent


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def storable(text: str) -> bool:
    """What PostgreSQL text takes: UTF-8 (no lone surrogate), no NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def test_a_symlink_loop_over_a_file_stays_inside(tmp_path: Path) -> None:
    """The case hypothesis found: a file, then a symlink at the same name pointing at itself.
    Extraction keeps the later entry (a loop that resolves to nothing), and the tree passes."""
    dest = tmp_path / "dest"
    dest.mkdir()
    archive = tmp_path / "loop.tar"
    with tarfile.open(archive, "w") as tar:
        f = tarfile.TarInfo("top/a/a//")
        f.mode = 0o644
        tar.addfile(f, io.BytesIO(b""))
        link = tarfile.TarInfo("top/a/a//")
        link.type = tarfile.SYMTYPE
        link.linkname = "../a/a//"
        tar.addfile(link)
    bootstrap.extract_safely(archive, dest, strip=1, budget=BUDGET)
    assert (dest / "a" / "a").is_symlink()
    assert link_destination(dest / "a" / "a") is None
    check_extracted_tree(dest)
