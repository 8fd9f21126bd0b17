"""CPU slots: CPU-heavy work (decompressing and extracting archives) limited to what the cores do at once."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# The engine runs every ready step at once (they mostly wait: network, apt,
# locks), but four extractions on two cores only slow each other down and
# push the one on the critical path back. So CPU-heavy work takes a slot
# first: at most `slots` hold one (os.cpu_count() unless the config says),
# and a free slot goes to the waiter with the highest priority (the biggest
# archive: the longest install is on the critical path), first come first
# served among equals. Downloads and apt (waiting on the network and on
# dpkg's locks) take no slot.


@dataclass(order=True)
class SlotWaiter:
    key: tuple[float, int]  # (-priority, arrival): the smallest is served first
    who: str = field(compare=False)


class CpuSlots:
    """A counting semaphore served by priority; `granted` records who got a
    slot, in order, and `peak` the most slots held at once (for the tests and
    the log). on_wait(who, holders) is called when a request has to wait,
    on_granted(who, waited_s) when a waiting request gets its slot."""

    def __init__(
        self,
        slots: int,
        *,
        on_wait: Callable[[str, list[str]], None] | None = None,
        on_granted: Callable[[str, float], None] | None = None,
    ) -> None:
        self.slots = max(1, slots)
        self.on_wait = on_wait
        self.on_granted = on_granted
        self._cond = threading.Condition()
        self._holders: list[str] = []
        self._waiting: list[SlotWaiter] = []
        self._arrivals = itertools.count()
        self.granted: list[str] = []
        self.peak = 0

    def waiting(self) -> list[str]:
        with self._cond:
            return [w.who for w in sorted(self._waiting)]

    def holders(self) -> list[str]:
        with self._cond:
            return list(self._holders)

    @contextlib.contextmanager
    def slot(self, who: str, priority: float = 0.0) -> Iterator[None]:
        me = SlotWaiter((-priority, next(self._arrivals)), who)
        start = time.monotonic()
        with self._cond:
            self._waiting.append(me)
            waited = not self._my_turn(me)
            holders = list(self._holders)
        try:
            if waited and self.on_wait is not None:
                self.on_wait(who, holders)  # outside the lock: it logs and emits events
        except BaseException:
            with self._cond:
                self._waiting.remove(me)
                self._cond.notify_all()
            raise
        with self._cond:
            try:
                while not self._my_turn(me):
                    self._cond.wait()
            finally:
                self._waiting.remove(me)
                self._cond.notify_all()  # the next waiter may be served now (or we left the queue)
            self._holders.append(who)
            self.granted.append(who)
            self.peak = max(self.peak, len(self._holders))
        if waited and self.on_granted is not None:
            self.on_granted(who, time.monotonic() - start)
        try:
            yield
        finally:
            with self._cond:
                self._holders.remove(who)
                self._cond.notify_all()

    def _my_turn(self, me: SlotWaiter) -> bool:
        return len(self._holders) < self.slots and min(self._waiting) is me


@contextlib.contextmanager
def cpu_slot(slots: CpuSlots | None, who: str, priority: float = 0.0) -> Iterator[None]:
    """A slot of `slots`, or no limit at all when there is none (a step run outside the engine)."""
    if slots is None:
        yield
        return
    with slots.slot(who, priority):
        yield


# The link, too, is a resource the critical path should get first. On a
# cold host apt is the longest chain (update, its downloads, then dpkg), and
# when the bundles' downloads start at the same moment they take most of a
# shared link: measured at 50 MB/s, `apt-get update` took 7-13 s instead of
# 2.6 s alone. So while apt fetches (its lists and its packages, a few tens
# of MB) our own downloads wait, and start the moment apt's downloads are
# done; dpkg then works while they run. Bounded: a download never waits
# longer than LINK_MAX_WAIT_S for it.
LINK_MAX_WAIT_S = 120.0


class LinkFirst:
    """Who has the link first: `holder` (a step name) until it releases it,
    or nobody (holder None: open from the start). turn() waits for the
    release, at most max_wait_s; release() is idempotent. on_wait(who,
    holder) is called when a turn has to wait, on_granted(who, waited_s,
    timed_out) when it ends."""

    def __init__(
        self,
        holder: str | None,
        *,
        max_wait_s: float = LINK_MAX_WAIT_S,
        on_wait: Callable[[str, str], None] | None = None,
        on_granted: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        self.holder = holder
        self.max_wait_s = max_wait_s
        self.on_wait = on_wait
        self.on_granted = on_granted
        self._free = threading.Event()
        if holder is None:
            self._free.set()

    @property
    def held(self) -> bool:
        return not self._free.is_set()

    def release(self) -> None:
        self._free.set()

    def turn(self, who: str) -> float:
        """Wait until the holder has released the link (or max_wait_s); returns the seconds waited."""
        if self._free.is_set() or who == self.holder:
            return 0.0
        start = time.monotonic()
        if self.on_wait is not None:
            self.on_wait(who, self.holder or "")
        released = self._free.wait(self.max_wait_s)
        waited = time.monotonic() - start
        if self.on_granted is not None:
            self.on_granted(who, waited, not released)
        return waited
