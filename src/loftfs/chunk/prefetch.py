"""Sequential-access detection for readahead. Each open handle has a ``ReadState``; a read that
continues where the previous one ended widens the readahead window (doubling, up to the
mount's limit), any other read closes it, so random access never pays for readahead."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

# Reads arrive slightly out of order when the kernel issues several at once; a read starting
# this close to where the previous one ended still counts as sequential.
SEQ_TOLERANCE = 256 << 10


@dataclass
class ReadState:
    next_offset: int = -1  # where the previous read ended; -1 before the first read
    window: int = 0  # readahead window, in blocks
    ahead_until: int = 0  # file offset up to which readahead was already requested
    sequential_reads: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(
        self, offset: int, end: int, file_size: int, block_size: int, max_blocks: int
    ) -> tuple[int, int] | None:
        """Record a read of ``[offset, end)``; return the file range to read ahead, if any."""
        with self._lock:
            if self.next_offset < 0:
                sequential = offset == 0  # a stream from the start is the common case
            else:
                sequential = abs(offset - self.next_offset) <= max(SEQ_TOLERANCE, end - offset)
            self.next_offset = end
            if not sequential or max_blocks <= 0:
                self.window = 0
                self.ahead_until = 0
                self.sequential_reads = 0
                return None
            self.sequential_reads += 1
            self.window = min(max_blocks, max(1, self.window * 2))
            start = max(end, self.ahead_until)
            stop = min(file_size, end + self.window * block_size)
            if start >= stop:
                return None
            self.ahead_until = stop
            return start, stop
