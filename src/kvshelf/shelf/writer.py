"""A bounded background writer: storage never blocks the engine.

When the queue is full a job is dropped and counted, not waited for. A failing job is
logged; the thread carries on with the next one.
"""

import logging
import queue
from collections.abc import Callable

from kvshelf.threads import background_thread

logger = logging.getLogger(__name__)


class BackgroundWriter:
    def __init__(self, queue_size: int, on_drop: Callable[[], None]) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=queue_size)
        self._on_drop = on_drop
        self._thread = background_thread(self._run, "kvshelf-writer")

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue `job`; False (and counted) if the queue is full."""
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self._on_drop()
            return False
        return True

    def flush(self) -> None:
        """Wait until every queued job has run."""
        self._jobs.join()

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                job()
            except Exception:  # noqa: BLE001 - one bad job must not kill the writer
                logger.exception("kvshelf: background write failed")
            finally:
                # Not held while waiting for the next: its chunks may be arena memory the tier evicts.
                job = None
                self._jobs.task_done()
