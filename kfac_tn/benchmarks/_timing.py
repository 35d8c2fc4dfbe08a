"""Timing and memory helpers shared by the benchmarks.

Timing (:func:`time_call`): warm-up calls, then ``repeats`` timed rounds; each round runs the
callable ``number`` times (calibrated so that a round lasts at least ``min_round_s``, which
keeps the clock resolution and Python overhead of microsecond-sized calls out of the figure),
synchronising CUDA before starting and after stopping the clock. The reported time is the
median per-call time over rounds.

Memory (:func:`measure_memory`) reports bytes allocated by torch *during one call*, relative to
what was allocated before it:

* ``peak_bytes``: the highest extra allocation at any moment of the call;
* ``retained_bytes``: the extra allocation still held when the call has returned (its outputs,
  plus anything it cached);
* ``aux_bytes = peak_bytes - retained_bytes``: the auxiliary memory, i.e. the peak minus the
  outputs. Inputs are allocated before the call and are not counted.

On CUDA it reads the caching allocator's statistics (``torch.cuda.reset_peak_memory_stats``,
``max_memory_allocated``, ``memory_allocated``). On CPU, where torch keeps no allocator
statistics, it runs the call under ``torch.profiler`` with ``profile_memory=True`` and replays
the allocation and free events of torch's CPU allocator in time order. This sees every tensor
allocation made by torch kernels (including kernel-internal scratch tensors such as the padded
copy inside ``im2col``), but not memory that libraries below torch allocate themselves (e.g. a
BLAS library's private workspace) nor Python objects. Per-thread scratch of intra-op parallel
kernels is included (e.g. the weight VJP's peak grows slightly from 1 to 2 threads).
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """Result of :func:`time_call`.

    Attributes:
        median_s: Median per-call time over rounds, in seconds.
        min_s: Fastest per-call time over rounds, in seconds.
        number: Calls per timed round.
        rounds: Per-call time of each round, in seconds.
    """

    median_s: float
    min_s: float
    number: int
    rounds: tuple[float, ...]


@dataclass(frozen=True)
class Memory:
    """Result of :func:`measure_memory` (bytes; see the module docstring)."""

    peak_bytes: int
    retained_bytes: int

    @property
    def aux_bytes(self) -> int:
        """Auxiliary memory: peak minus what the call still holds afterwards (its outputs)."""
        return max(0, self.peak_bytes - self.retained_bytes)


def synchronize(device: torch.device | str) -> None:
    """Wait for all queued kernels on ``device`` (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    *,
    repeats: int = 5,
    warmup: int = 1,
    min_round_s: float = 2e-3,
    max_number: int = 10_000,
) -> Timing:
    """Time a zero-argument callable.

    Args:
        fn: The call to time; its result is discarded.
        device: Device the call runs on (CUDA is synchronised around each round).
        repeats: Number of timed rounds (``>= 1``).
        warmup: Untimed calls before calibration (``>= 0``); they absorb one-off costs such
            as plan caching or an ``impl="auto"`` selection.
        min_round_s: Target minimum duration of one round; sets the calls per round.
        max_number: Upper bound on the calls per round.

    Returns:
        The :class:`Timing`.

    Raises:
        ValueError: If ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1:
        raise ValueError(f"Invalid repeats: {repeats!r} (must be >= 1)")
    if warmup < 0:
        raise ValueError(f"Invalid warmup: {warmup!r} (must be >= 0)")
    for _ in range(warmup):
        fn()
    synchronize(device)
    number = _calibrate(fn, device, min_round_s, max_number)
    rounds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(number):
            fn()
        synchronize(device)
        rounds.append((time.perf_counter() - start) / number)
    return Timing(statistics.median(rounds), min(rounds), number, tuple(rounds))


def time_calls(
    calls: Mapping[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    *,
    repeats: int = 5,
    warmup: int = 1,
    min_round_s: float = 2e-3,
    max_number: int = 10_000,
) -> dict[str, Timing]:
    """Time several calls with interleaved rounds, so that they share the machine's load.

    On a shared machine the load drifts over seconds; timing implementation A fully before
    implementation B biases their ratio. Here every call is warmed up and calibrated (as in
    :func:`time_call`), then round ``r`` times each call once, in an order rotated by ``r``.

    Args:
        calls: Name -> zero-argument callable.
        device: Device the calls run on.
        repeats: Timed rounds per call (``>= 1``).
        warmup: Untimed calls per callable before calibration (``>= 0``).
        min_round_s: Target minimum duration of one round of one call.
        max_number: Upper bound on the calls per round.

    Returns:
        Name -> :class:`Timing`, in the order of ``calls``.

    Raises:
        ValueError: If ``repeats < 1`` or ``warmup < 0``.
    """
    if repeats < 1:
        raise ValueError(f"Invalid repeats: {repeats!r} (must be >= 1)")
    if warmup < 0:
        raise ValueError(f"Invalid warmup: {warmup!r} (must be >= 0)")
    names = list(calls)
    numbers = {}
    for name in names:
        fn = calls[name]
        for _ in range(warmup):
            fn()
        numbers[name] = _calibrate(fn, device, min_round_s, max_number)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            fn, number = calls[name], numbers[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(number):
                fn()
            synchronize(device)
            rounds[name].append((time.perf_counter() - start) / number)
    return {
        name: Timing(statistics.median(rs), min(rs), numbers[name], tuple(rs))
        for name, rs in rounds.items()
    }


def _calibrate(
    fn: Callable[[], object], device: torch.device | str, min_round_s: float, max_number: int
) -> int:
    """Return the calls per round for rounds of ``>= min_round_s`` (fastest of up to 3 calls)."""
    single = float("inf")
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        single = min(single, time.perf_counter() - start)
        if single >= min_round_s:
            return 1
    return min(max_number, int(min_round_s / max(single, 1e-9)) + 1)


def measure_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> Memory:
    """Measure the peak and retained torch allocations of one call of ``fn``.

    Call it after a warm-up call, so that one-off caches are not attributed to the call.
    The result of ``fn`` is kept alive until the measurement ends, so it counts as retained.

    Args:
        fn: The call to measure.
        device: Device the call allocates on (``cpu`` or ``cuda``).

    Returns:
        The :class:`Memory` (see the module docstring for what is measured).

    Raises:
        ValueError: If the device type is neither ``cpu`` nor ``cuda``.
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Invalid device: {str(device)!r} (allowed device types: 'cpu', 'cuda')")
    # no garbage collection during the call: freeing older garbage would hide allocations
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cpu":
            return _cpu_memory(fn)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        retained = torch.cuda.memory_allocated(device) - before
        del result
        return Memory(int(peak), int(retained))
    finally:
        if gc_enabled:
            gc.enable()


def _cpu_memory(fn: Callable[[], object]) -> Memory:
    """CPU variant of :func:`measure_memory` via the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    allocation = torch._C._profiler._EventType.Allocation
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return Memory(int(peak), int(max(current, 0)))
