"""The host-memory arena: where the memory tier's chunks live, mapped once, faulted in ahead of use.

Why: a chunk read from disk or Redis used to land in freshly allocated memory, and the first
touch of every fresh page is a page fault. On this project's VMs, allocating and touching 88 MB
(a 1.9k-token prompt of the bundled model) took ~240 ms the first time and ~5 ms when the
allocator reused memory, so a disk hit took 1.6-3.5x a memory hit although reading the bytes from
the page cache took ~40 ms. The arena maps the memory tier's whole budget once, advises it for
transparent huge pages (MADV_HUGEPAGE: one fault per 2 MiB instead of per 4 KiB), and faults it in
ahead of use on a background thread; every chunk is a view of it, so memory faulted once is
reused for good and the kernel never takes it back.

Faulted in ahead of use, not all at start (measured here, THP on): 64 MiB take ~8 ms, but 2 GiB
took 4 s once the kernel had to compact memory for huge pages, and every process (each test's
shelf, the scheduler's) would hold its whole budget in RAM at once. So the mapping reserves only
address space (MAP_NORESERVE), and the pre-fault thread keeps the first max(PREFAULT_MIN_BYTES,
2 x the highest byte ever allocated) faulted in, with MADV_POPULATE_WRITE (Linux 5.14+: faults
pages in without writing them, so it may run over memory already in use). Allocation takes the
smallest free range that fits, the lowest first, so chunks stay in the faulted part. An
allocation that gets ahead of the thread faults its own pages, as any fresh memory would.

Allocation: best fit over free byte ranges (ordered by size, then address), a freed range merged
with its free neighbours; every slot starts and ends on ALIGN_BYTES. A slot is freed when the last
view of it dies (a finalizer on the ctypes object that owns it, which every numpy array, memoryview
and tensor made from it keeps alive), so a chunk the memory tier evicts stays valid for whoever
still holds it. `release` frees a slot at once, for a buffer nothing else reads (a read that
failed verification). Finalizers only queue their slot; the next allocation returns it to the
free ranges under the lock, so dropping a view anywhere never takes the lock.

The seam for a GPU path: copies between the GPU and host memory are asynchronous only from pinned
(page-locked) memory. The arena is one mapping, so it is pinned once: register
[address, address + size_bytes) with cudaHostRegister (`torch.cuda.cudart().cudaHostRegister(
address, size_bytes, 0)`) after creating it and unregister it before closing it; every chunk is
then pinned memory. Registering faults in the whole range, which a GPU server wants anyway.
"""

import bisect
import ctypes
import logging
import mmap
import threading
import weakref
from collections import deque

import numpy as np

from kvshelf.threads import background_thread

logger = logging.getLogger(__name__)

ALIGN_BYTES = 64  # a cache line: every slot starts and ends on one
PREFAULT_MIN_BYTES = 64 * 2**20
PREFAULT_STEP_BYTES = 32 * 2**20  # per madvise call: the thread stops promptly when the arena closes
HUGE_PAGE_BYTES = 2 * 2**20  # the pre-fault target is a multiple of it (madvise needs page-aligned starts)
MADV_POPULATE_WRITE = 23  # Linux 5.14+; not in Python 3.11's mmap module
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; in the mmap module from Python 3.13
_libc = ctypes.CDLL(None, use_errno=True)  # its calls release the GIL, unlike mmap.madvise


def fresh_buffer(num_bytes: int) -> memoryview:
    """Writable, uninitialised memory (no zero fill) for a read that has no arena to land in."""
    return memoryview(np.empty(num_bytes, dtype=np.uint8))


def buffer_address(buffer: object) -> int:
    """The address of the first byte of a tensor or of any object with the buffer protocol."""
    data_ptr = getattr(buffer, "data_ptr", None)  # a torch.Tensor
    if data_ptr is not None:
        return data_ptr()
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def _slot_bytes(num_bytes: int, padding: int) -> int:
    """A slot's size: the buffer and the padding before it, rounded up; never 0, so each slot has its own start."""
    return max(-(-(padding + num_bytes) // ALIGN_BYTES) * ALIGN_BYTES, ALIGN_BYTES)


def advise(mapping: mmap.mmap, advice: int) -> bool:
    """madvise the whole mapping; False (and nothing else) where the kernel does not support `advice`."""
    try:
        mapping.madvise(advice)
    except OSError as exc:
        logger.debug("kvshelf: madvise(%d) is not supported here (%s); going on without it", advice, exc)
        return False
    return True


class FreeRanges:
    """The free byte ranges of an arena: the best fit is taken, a returned range merged with its neighbours."""

    def __init__(self, size_bytes: int) -> None:
        self._by_size: list[tuple[int, int]] = []  # (size, start), sorted: the best fit is the first that fits
        self._size_at: dict[int, int] = {}  # start -> size
        self._start_ending_at: dict[int, int] = {}  # end -> start
        if size_bytes:
            self._add(0, size_bytes)

    def __len__(self) -> int:
        return len(self._by_size)

    def take(self, size_bytes: int) -> int | None:
        """The start of `size_bytes` taken from the smallest free range that holds them (the lowest of
        equal ones); None if no range does."""
        index = bisect.bisect_left(self._by_size, (size_bytes, -1))
        if index == len(self._by_size):
            return None
        free_bytes, start = self._by_size[index]
        self._remove(start)
        if free_bytes > size_bytes:
            self._add(start + size_bytes, free_bytes - size_bytes)
        return start

    def give(self, start: int, size_bytes: int) -> None:
        """Return [start, start + size_bytes), merged with a free range just before or after it."""
        before = self._start_ending_at.get(start)
        if before is not None:
            self._remove(before)
            start, size_bytes = before, size_bytes + start - before
        after_bytes = self._size_at.get(start + size_bytes)
        if after_bytes is not None:
            self._remove(start + size_bytes)
            size_bytes += after_bytes
        self._add(start, size_bytes)

    def _add(self, start: int, size_bytes: int) -> None:
        bisect.insort(self._by_size, (size_bytes, start))
        self._size_at[start] = size_bytes
        self._start_ending_at[start + size_bytes] = start

    def _remove(self, start: int) -> None:
        size_bytes = self._size_at.pop(start)
        del self._start_ending_at[start + size_bytes]
        del self._by_size[bisect.bisect_left(self._by_size, (size_bytes, start))]


class _Prefault:
    """What the pre-fault thread shares with its arena: not the arena itself, so an arena nobody
    closed is still collected (and stops its thread). It holds the mapping until the thread ends,
    so nothing it touches is unmapped under it."""

    def __init__(self, mapping: mmap.mmap, address: int) -> None:
        self.mapping: mmap.mmap | None = mapping
        self.address = address
        self.target_bytes = 0  # set by the arena; the thread faults in up to here
        self.faulted_bytes = 0
        self.wake = threading.Event()
        self.stopped = False
        self.thread = background_thread(self.run, "kvshelf-prefault")

    def run(self) -> None:
        try:
            self._fault_in_ahead()
        finally:
            self.mapping = None

    def _fault_in_ahead(self) -> None:
        while not self.stopped:
            if self.faulted_bytes >= self.target_bytes:
                self.wake.wait()
                self.wake.clear()
                continue
            step_bytes = min(PREFAULT_STEP_BYTES, self.target_bytes - self.faulted_bytes)
            if _libc.madvise(ctypes.c_void_p(self.address + self.faulted_bytes), ctypes.c_size_t(step_bytes),
                             MADV_POPULATE_WRITE) != 0:
                logger.info("kvshelf: the memory tier is not faulted in ahead of use (madvise MADV_POPULATE_WRITE "
                            "failed with errno %d; it needs Linux 5.14 or later): chunks fault their own pages in",
                            ctypes.get_errno())
                return
            self.faulted_bytes += step_bytes

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()


class Arena:
    """`size_bytes` of host memory (rounded down to ALIGN_BYTES) handing out aligned slots; thread-safe.

    `prefault`: fault memory in ahead of use on a background thread (see the module docstring).
    """

    def __init__(self, size_bytes: int, prefault: bool = True) -> None:
        self.size_bytes = size_bytes - size_bytes % ALIGN_BYTES
        self._lock = threading.Lock()
        self._free = FreeRanges(self.size_bytes)
        self._slots: dict[int, weakref.finalize] = {}  # by the address callers hold
        self._dead: deque[tuple[int, int, int]] = deque()  # (address, start, size) of slots freed, not yet returned
        self._used_bytes = 0
        self._high_water_bytes = 0
        self._closed = False
        self._prefault: _Prefault | None = None
        self.huge_pages = False
        if not self.size_bytes:
            self._mapping, self.address = None, 0
            return
        self._mapping = mmap.mmap(-1, self.size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        self.huge_pages = hasattr(mmap, "MADV_HUGEPAGE") and advise(self._mapping, mmap.MADV_HUGEPAGE)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._mapping))
        if prefault:
            self._prefault = _Prefault(self._mapping, self.address)
            weakref.finalize(self, self._prefault.stop)
            self._raise_prefault_target()

    @property
    def used_bytes(self) -> int:
        """Bytes in slots (each rounded up to ALIGN_BYTES)."""
        with self._lock:
            self._return_dead()
            return self._used_bytes

    @property
    def faulted_bytes(self) -> int:
        """How much of the arena, from its start, the pre-fault thread has faulted in."""
        return self._prefault.faulted_bytes if self._prefault is not None else 0

    def can_hold(self, num_bytes: int, aligned_at: int = 0) -> bool:
        """Whether a buffer of `num_bytes` fits the arena when nothing else is in it."""
        return _slot_bytes(num_bytes, -aligned_at % ALIGN_BYTES) <= self.size_bytes and not self._closed

    def owns(self, address: int) -> bool:
        return self.address <= address < self.address + self.size_bytes

    def allocate(self, num_bytes: int, aligned_at: int = 0) -> memoryview | None:
        """A writable buffer of `num_bytes` whose byte `aligned_at` lies on ALIGN_BYTES (where a payload
        starts after its header); None if no free range holds it. Freed when the last view of it dies."""
        padding = -aligned_at % ALIGN_BYTES
        size_bytes = _slot_bytes(num_bytes, padding)
        with self._lock:
            self._return_dead()
            start = self._free.take(size_bytes) if not self._closed else None
            if start is None:
                return None
            self._used_bytes += size_bytes
            owner = (ctypes.c_char * num_bytes).from_buffer(self._mapping, start + padding)
            address = self.address + start + padding
            self._slots[address] = weakref.finalize(owner, self._dead.append, (address, start, size_bytes))
            if start + size_bytes > self._high_water_bytes:
                self._high_water_bytes = start + size_bytes
                self._raise_prefault_target()
        return memoryview(owner).cast("B")

    def release(self, address: int) -> None:
        """Free the slot at `address` (of a buffer the caller holds) now, whatever else still views it:
        only for a buffer nothing will read again. An address that is not a slot's is ignored."""
        with self._lock:
            slot = self._slots.get(address)
            if slot is not None:
                slot()  # queues it, once: its finalizer is spent
                self._return_dead()

    def _return_dead(self) -> None:
        while self._dead:
            address, start, size_bytes = self._dead.popleft()
            self._slots.pop(address, None)
            self._free.give(start, size_bytes)
            self._used_bytes -= size_bytes

    def _raise_prefault_target(self) -> None:
        if self._prefault is None:
            return
        wanted_bytes = max(PREFAULT_MIN_BYTES, 2 * self._high_water_bytes)
        target_bytes = min(self.size_bytes, -(-wanted_bytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES)
        if target_bytes > self._prefault.target_bytes:
            self._prefault.target_bytes = target_bytes
            self._prefault.wake.set()

    def num_free_ranges(self) -> int:
        """How fragmented the free space is (1: one range)."""
        with self._lock:
            self._return_dead()
            return len(self._free)

    def close(self) -> None:
        """Stop pre-faulting and allocating. The mapping goes when the last view of it does."""
        with self._lock:
            self._closed = True
            self._mapping = None
        if self._prefault is not None:
            self._prefault.stop()
            self._prefault.thread.join()
