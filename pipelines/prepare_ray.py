"""Where the steps of a prepare run: in this process, one after the other, or as Ray tasks.

Both executors offer one operation, ``map(desc, fn, calls, weights)``: run ``fn(*args)`` for
every ``args`` in ``calls`` and return the results in call order, with a progress bar whose
total is ``sum(weights)`` (bytes for parsing, rows after). The driver never needs to know which
executor it has; only ``parallelism`` (how many tasks can run at once) shapes how finely it
cuts the input, and the cut never changes the output.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A task holds one CPU, so its polars should not start a thread per core: N tasks on N cores
# would run N * N threads. This is resource accounting, the way Ray sets OMP_NUM_THREADS; on
# the 2-core dev box one or two threads per task measured the same within the noise. Polars
# reads the pool size from the environment once per process, so the workers need it at start.
_POLARS_THREADS = {"POLARS_MAX_THREADS": "1"}


@dataclass
class SerialExecutor:
    """Runs every call here, in order: no Ray, the fine-grained progress of each step is shown.

    ``parallelism`` is 1 for the real serial path; a larger value only makes the driver cut the
    input as it would for that many workers, which lets tests check that the cut never changes
    the output without paying for Ray.
    """

    parallelism: int = 1
    tasks: int = 0

    def describe(self) -> str:
        return "serial" if self.parallelism == 1 else f"serial, cut for {self.parallelism} workers"

    def map(
        self,
        desc: str,
        fn: Callable[..., T],
        calls: Sequence[tuple[Any, ...]],
        weights: Sequence[int],
        unit: str = "row",
        progress: bool = True,
    ) -> list[T]:
        self.tasks += len(calls)
        with tqdm(total=sum(weights), desc=desc, unit=unit, unit_scale=True, disable=not progress) as bar:
            return [fn(*args, progress=bar.update) for args in calls]


@dataclass
class RayExecutor:
    """Runs each call as a Ray task (one CPU each), at most ``parallelism`` in flight.

    Tasks read and write files under the prepare's stage directory, so with a multi-node cluster
    the inputs and the output directory must be on storage every node sees at the same path.
    """

    parallelism: int
    tasks: int = 0

    def describe(self) -> str:
        return f"ray, {self.parallelism} workers, {self.tasks} tasks"

    def map(
        self,
        desc: str,
        fn: Callable[..., T],
        calls: Sequence[tuple[Any, ...]],
        weights: Sequence[int],
        unit: str = "row",
        progress: bool = True,
    ) -> list[T]:
        import ray

        remote = ray.remote(num_cpus=1)(fn)
        results: list[Any] = [None] * len(calls)
        pending: dict[Any, int] = {}
        submitted = 0
        self.tasks += len(calls)
        with tqdm(total=sum(weights), desc=f"{desc} ({len(calls)} tasks)", unit=unit, unit_scale=True,
                  disable=not progress) as bar:
            try:
                while submitted < len(calls) or pending:
                    while submitted < len(calls) and len(pending) < self.parallelism:
                        pending[remote.remote(*calls[submitted])] = submitted
                        submitted += 1
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        index = pending.pop(ref)
                        results[index] = ray.get(ref)
                        bar.update(weights[index])
            except BaseException:
                _cancel(pending)
                raise
        return results


def _cancel(pending: dict[Any, int]) -> None:
    """Stop the tasks still queued or running and wait for them, so none writes into a stage dir being removed."""
    import ray

    refs = list(pending)
    for ref in refs:
        ray.cancel(ref)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=60)


@contextmanager
def ray_executor(workers: int | None, address: str | None) -> Iterator[RayExecutor]:
    """A `RayExecutor` on the running Ray, else on a Ray started here (and shut down after).

    Started here: on ``address`` when given, else a local Ray with ``workers`` CPUs (all of
    this machine's by default), the way `tablezip sweep` starts one. ``parallelism`` is
    ``workers`` capped by the CPUs Ray has, or all of them when ``workers`` is None.

    The workers of a local Ray started here get one polars thread each through the environment
    they inherit from this process. A Ray started elsewhere keeps its own environment: a
    per-task ``runtime_env`` would do the same but makes Ray start dedicated workers (about 2 s
    more per prepare on the dev box), so for a cluster set POLARS_MAX_THREADS where it starts.
    """
    import ray

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            with _environment(_POLARS_THREADS):
                ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        started = True
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        yield RayExecutor(parallelism=min(workers, cpus) if workers else cpus)
    finally:
        if started:
            ray.shutdown()


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (for the processes started meanwhile), then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
