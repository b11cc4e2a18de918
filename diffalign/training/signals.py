"""Stopping on SIGTERM and SIGUSR1, the signals SLURM and Kubernetes send some time before they kill a job.

While the loop runs, either signal asks it to stop: at the next optimizer step every process saves a
checkpoint and the loop raises :class:`TrainingInterrupted`, which the command line turns into exit status
128 + signal number. The handler only records the signal, so a checkpoint being written is never cut short,
and the processes of a multi-process run agree on the step to stop at (one all-reduce per step).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path) -> None:
        name = signal.Signals(signal_number).name
        super().__init__(
            f"training stopped by {name} at step {step}; progress saved to {checkpoint}, continue with "
            "run.resume=latest"
        )
        self.signal_number = signal_number
        self.checkpoint = checkpoint


class StopRequests:
    """A context in which SIGTERM and SIGUSR1 are recorded instead of ending the process."""

    def __init__(self) -> None:
        self.received = 0  # the last signal number received, 0 for none
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        # Python runs handlers in the main thread only, and installs them from there only.
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def _record(self, number: int, frame: FrameType | None) -> None:
        self.received = number

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for number, handler in self._previous.items():
            if handler is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(number, handler)
        self._previous.clear()

    def requested(self, accelerator: Accelerator) -> int:
        """The signal any process received (0 for none); every process calls it at the same step."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([self.received], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item())
