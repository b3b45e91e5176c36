"""The producer in a DataLoader worker process, and the two-way traffic with it.

Worker -> trainer: the DataLoader's own queue carries one item per window: the window's
tensors, the producer's state after that window (what a checkpoint must save once the
trainer has consumed it) and the curation report whenever it changed.

Trainer -> worker: a `multiprocessing` queue carries `("progress", n)` before the trainer asks
for window n, and `("report", apply_at, losses)` for each loss report. Before producing window
w the worker waits until it has heard progress >= w - FEEDBACK_LAG + 1: by then every report
that must steer window w has been sent (reports and progress share one queue, so they arrive
in order) and applied. The trainer always sends progress n before it waits for window n, so
the wait cannot deadlock; with a prefetch shorter than the lag it does not happen at all.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import queue
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..lifetime import die_with_parent
from .packing import Window
from .producer import FEEDBACK_LAG, Plan, Producer

PREFETCH_WINDOWS = 32
"""Windows the worker may hold ready (< FEEDBACK_LAG, see the module docstring)."""


class WindowDataset(IterableDataset):  # type: ignore[type-arg]
    def __init__(self, plan: Plan, start: dict[str, Any], messages: Any):
        self.plan, self.start, self.messages = plan, start, messages
        self._progress = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        producer = Producer(self.plan)
        producer.load_state_dict(self.start)
        self._progress = producer.windows
        version = -1
        while True:
            self._await(producer, producer.windows - FEEDBACK_LAG + 1)
            window = producer.next_window()
            report = producer.report.to_dict() if producer.report_version != version else None
            version = producer.report_version
            yield {"window": _tensors(window), "state": producer.state_dict(), "report": report}

    def _await(self, producer: Producer, progress: int) -> None:
        """Take in the trainer's messages; block until its progress reaches `progress`."""
        while True:
            try:
                message = self.messages.get(block=self._progress < progress)
            except queue.Empty:
                return
            if message[0] == "progress":
                self._progress = max(self._progress, int(message[1]))
            else:
                producer.feed(int(message[1]), message[2])


def start(plan: Plan, state: dict[str, Any]) -> tuple[Iterator[dict[str, Any]], Any]:
    """(item iterator, message queue) of a fresh worker that continues from `state`."""
    messages = multiprocessing.get_context().Queue()
    loader = DataLoader(WindowDataset(plan, state, messages), batch_size=None, num_workers=1,
                        prefetch_factor=PREFETCH_WINDOWS,
                        worker_init_fn=functools.partial(_leave_stops_to_trainer, os.getpid()),
                        pin_memory=torch.cuda.is_available())
    return iter(loader), messages


def _leave_stops_to_trainer(trainer_pid: int, _: int) -> None:
    """Ctrl-C and a stop sent to the trainer's process group must not reach this worker: the
    trainer answers them with a checkpoint, which needs the worker alive until then. So the
    worker gets a process group of its own (the DataLoader can still terminate it), and the
    kernel kills it if the trainer dies first."""
    os.setpgid(0, 0)
    die_with_parent(trainer_pid)


def _tensors(window: Window) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(getattr(window, name))
            for name in ("input_ids", "labels", "position_ids", "source_ids")}


def window_of(tensors: dict[str, torch.Tensor]) -> Window:
    return Window(*(tensors[n].numpy() for n in ("input_ids", "labels", "position_ids",
                                                   "source_ids")))
