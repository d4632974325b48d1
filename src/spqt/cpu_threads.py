"""How many intra-op threads a CPU decode step uses: all of torch's when the cores are free, one
when another process holds a core.

A one-token GEMV split over 2 threads waits, at its end, for the slower thread; when a core is
busy with another process, that thread gets its turn only at the scheduler's next slice, and
each split GEMV costs milliseconds instead of tenths of one (2-core EPYC, a pytest on one core:
an fp16 960x576 GEMV 4-8 ms on 2 threads against 0.1 ms on 1; 121 GEMVs a step). So the choice
is measured, not assumed: before decoding and every `every` steps, one GEMV of a real weight is
timed with all threads and with one, and all threads are kept only when clearly faster; a step
far slower than the fastest one so far, on more than one thread, probes again at once (a wrong
choice under load cost 0.5-1.2 s a step).
"""

import time

import torch

PROBE_REPEATS = 3  # the median of 3 timings per count: one lucky or unlucky slice does not decide
# All threads must beat one by this factor. Quiet, 2 threads take 0.55-0.65 of one thread's time
# for the probe's GEMV; a lucky median under load comes closer to 1.
PARALLEL_MARGIN = 0.8
# A step this many times slower than the fastest so far means a stall (quiet steps vary < 2x).
STALL_FACTOR = 3.0


def _median_seconds(fn, repeats: int = PROBE_REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


class DecodeThreads:
    """probe: a callable running one representative GEMV. Use check(step) before each decode step
    and restore() after decoding (the count torch had before is put back)."""

    def __init__(self, probe, every: int = 16):
        self.probe = probe
        self.every = every
        self.most = torch.get_num_threads()
        self.threads = self.most
        self.fastest = float("inf")

    def choose(self) -> int:
        """Time the probe with all threads and with one; keep (and set) the faster count."""
        if self.most == 1:
            return 1
        timings = {}
        for n in (self.most, 1):
            torch.set_num_threads(n)
            self.probe()  # warm: the thread pool wakes, the weight's first pages are read
            timings[n] = _median_seconds(self.probe)
        self.threads = self.most if timings[self.most] < PARALLEL_MARGIN * timings[1] else 1
        torch.set_num_threads(self.threads)
        return self.threads

    def check(self, step: int) -> None:
        if step % self.every == 0:
            self.choose()

    def observe(self, seconds: float) -> None:
        """After each step: a stall on more than one thread probes again now."""
        if self.threads > 1 and seconds > STALL_FACTOR * self.fastest:
            self.choose()
        self.fastest = min(self.fastest, seconds)

    def restore(self) -> None:
        torch.set_num_threads(self.most)
