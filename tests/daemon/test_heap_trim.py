"""The daemon hands the C heap's free pages back after a burst of frees (``HeapTrimmer``):
glibc alone keeps every freed page that is not at the top of its heap."""

from __future__ import annotations

from pathlib import Path

from callboard.daemon.runner import TRIM_SLACK, CHeap, HeapTrimmer, keep_trimming
from twisted.internet.task import Clock


class FakeHeap(CHeap):
    def __init__(self) -> None:
        self.free = 0
        self.trims = 0
        super().__init__(lambda: self.free, self._count)

    def _count(self, pad: int) -> None:
        assert pad == 0
        self.trims += 1


def test_trims_after_a_burst_of_frees_not_on_every_look() -> None:
    heap = FakeHeap()
    heap.free = 5 << 20
    trimmer = HeapTrimmer(heap, slack=16 << 20)
    assert not trimmer() and heap.trims == 0  # nothing new lies free
    heap.free = 2 << 20  # used again: the least free seen is the new reference
    assert not trimmer()
    heap.free = 17 << 20  # 15 MB freed since: not enough
    assert not trimmer() and heap.trims == 0
    heap.free = 19 << 20  # 17 MB freed since the least seen
    assert trimmer() and heap.trims == 1
    assert not trimmer() and heap.trims == 1  # the same free memory is not trimmed twice
    heap.free = 3 << 20
    assert not trimmer()
    heap.free = 40 << 20  # reused and freed again: trimmed again
    assert trimmer() and heap.trims == 2


def test_keep_trimming_looks_on_the_reactor_clock() -> None:
    clock = Clock()
    loop = keep_trimming(clock, interval=5.0)
    assert loop is not None  # glibc (the daemon's platform)
    try:
        assert loop.running
        clock.advance(5.0)
        clock.advance(5.0)
        assert loop.running
    finally:
        loop.stop()


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_a_real_trim_returns_freed_pages_between_live_chunks() -> None:
    heap = CHeap.of_this_process()
    assert heap is not None  # glibc (the daemon's platform)
    heap.trim()
    trimmer = HeapTrimmer(heap, slack=TRIM_SLACK)
    freed: list[bytes] = []
    kept: list[bytes] = []
    for i in range(8000):  # 64 MB in 8 KiB chunks, each followed by one that stays
        freed.append(bytes(8192) + i.to_bytes(4, "little"))
        kept.append(bytes(600) + i.to_bytes(4, "little"))
    del freed  # free but resident: glibc keeps what is not at the top of its heap
    resident = _rss()
    assert trimmer()
    assert resident - _rss() > 32 << 20
    assert not trimmer()  # nothing newly freed
    assert len(kept) == 8000
