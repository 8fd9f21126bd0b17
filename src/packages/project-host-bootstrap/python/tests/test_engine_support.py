"""Shared helpers for the engine tests: a config built from the dataclasses,
fake steps that touch files in a temporary directory, a real local HTTP hub
that records event batches, and a driver that runs bootstrap.main() in a
subprocess with a plan of fake steps.

Run as a script it is that driver: `python test_engine_support.py SPEC.json ARGS...`.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

PYTHON_DIR = Path(__file__).resolve().parents[1]
if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))

import bootstrap  # noqa: E402

HOST_ID = "0b6f4d2e-8a1c-4d3e-9f5a-1c2b3d4e5f60"
TOKEN = "tok-SECRET-7d1e9c2b"  # noqa: S105 - a test token


# -- config -------------------------------------------------------------------


def dummy(tp: Any, name: str) -> Any:
    """A placeholder value of type tp (the engine never reads these fields)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return None if type(None) in args else dummy(args[0], name)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp, vars(bootstrap))
        return tp(**{f.name: dummy(hints[f.name], f.name) for f in dataclasses.fields(tp) if f.init})
    if origin is tuple or tp is tuple:
        return ()
    if origin in (dict, Mapping) or tp is dict or origin is typing.get_origin(Mapping[str, str]):
        return {}
    if tp is bool:
        return True
    if tp is int:
        return 1
    if tp is float:
        return 1.0
    return f"/tmp/unused/{name}"  # noqa: S108 - a placeholder, never touched


def make_config(root: Path, *, parallel: bool = True, events_url: str = "http://127.0.0.1:9/events") -> Any:
    base = dummy(bootstrap.Config, "config")
    return dataclasses.replace(
        base,
        host=dataclasses.replace(base.host, id=HOST_ID, name="test-host"),
        bootstrap_root=str(root),
        bootstrap_dir=str(root / "bootstrap"),
        parallel=parallel,
        hub=dataclasses.replace(base.hub, events_url=events_url),
    )


def write_token(config: Any, token: str = TOKEN) -> None:
    path = Path(config.token_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    path.chmod(0o600)


# -- fake steps ---------------------------------------------------------------


def make_steps(specs: Sequence[Mapping[str, Any]], workdir: Path) -> list[type[bootstrap.Step]]:
    """One Step class per spec {name, deps?, sleep?, fail?, content?}: apply()
    sleeps, then writes <workdir>/<name>.out with `content`; check() is
    satisfied when that file holds it. Every apply appends to applied.log."""
    classes: list[type[bootstrap.Step]] = []
    for spec in specs:

        class FakeStep(bootstrap.Step):
            name = spec["name"]
            deps = tuple(spec.get("deps", ()))
            weight_s = float(spec.get("weight", 1.0))
            _spec: ClassVar[dict[str, Any]] = dict(spec)

            def out(self) -> Path:
                return workdir / f"{self.name}.out"

            def inputs(self) -> Mapping[str, Any]:
                return {"content": self._spec.get("content", "v1")}

            def check(self) -> bootstrap.StepState:
                want = str(self.inputs()["content"])
                found = self.out().read_text() if self.out().exists() else None
                return bootstrap.StepState(found == want, f"{self.out().name} {'ok' if found == want else 'differs'}")

            def apply(self) -> None:
                with open(workdir / "applied.log", "a") as f:
                    f.write(f"start {self.name} {time.time():.6f}\n")
                if self._spec.get("command"):
                    bootstrap.run_command(self._spec["command"], timeout_s=float(self._spec.get("timeout", 60)))
                time.sleep(float(self._spec.get("sleep", 0)))
                if self._spec.get("fail"):
                    raise bootstrap.BootstrapError(f"{self.name} broke", hint=f"fix {self.name}")
                self.out().write_text(str(self.inputs()["content"]))
                if self._spec.get("marker"):  # the final step's job in the real plan
                    bootstrap.done_marker(self.config).write_text("done\n")
                with open(workdir / "applied.log", "a") as f:
                    f.write(f"end {self.name} {time.time():.6f}\n")

        if spec.get("no_check"):
            del FakeStep.check  # the base class's: refused by the plan
        FakeStep.__name__ = f"Fake_{spec['name']}"
        classes.append(FakeStep)
    return classes


def applied(workdir: Path) -> list[str]:
    """Names of the steps whose apply() finished, in order."""
    log = workdir / "applied.log"
    if not log.exists():
        return []
    return [line.split()[1] for line in log.read_text().splitlines() if line.startswith("end ")]


def started(workdir: Path) -> list[str]:
    log = workdir / "applied.log"
    return [line.split()[1] for line in log.read_text().splitlines() if line.startswith("start ")]


# -- a real hub ---------------------------------------------------------------


class Hub:
    """A ThreadingHTTPServer on 127.0.0.1 that records event batches;
    `up` False answers 503, `refuse` answers 400."""

    def __init__(self, port: int = 0) -> None:
        self.batches: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.up = True
        self.status_when_down = 503
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if not hub.up:
                    self.send_response(hub.status_when_down)
                    self.end_headers()
                    return
                hub.auth.append(self.headers.get("Authorization"))
                hub.batches.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"ok":true}')

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[dict[str, Any]]:
        return [event for batch in self.batches for event in batch["events"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def hub_server() -> Iterator[Hub]:
    hub = Hub()
    try:
        yield hub
    finally:
        hub.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- subprocess driver ----------------------------------------------------------


def write_spec(path: Path, *, root: Path, steps: Sequence[Any], **options: Any) -> Path:
    path.write_text(json.dumps({"root": str(root), "steps": list(steps), **options}))
    return path


def run_driver(spec: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, __file__, str(spec), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_driver(spec: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, str(spec), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def driver_main(argv: Sequence[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    root = Path(spec["root"])
    config = make_config(
        root, parallel=spec.get("parallel", True), events_url=spec.get("events_url", "http://127.0.0.1:9/events")
    )
    bootstrap.load_config = lambda path: config  # the config loader is not under test here
    workdir = root / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    steps = make_steps(spec["steps"], workdir)
    return bootstrap.main(["--config", "unused.json", *argv[1:]], steps=steps, flush_s=float(spec.get("flush_s", 10)))


if __name__ == "__main__":
    sys.exit(driver_main(sys.argv[1:]))
