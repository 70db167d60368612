"""Preemption: SIGUSR1/SIGTERM set a flag that the training loop acts on at a step boundary.

Exit codes of `python -m ddn_dist.train` (launchers requeue on REQUEUE_EXIT_CODE):
  0   training finished, or stopped at train.stop_at_step after saving a checkpoint
  1   error (see the log)
  2   invalid configuration or command line
  75  preempted: a checkpoint was saved at the step where every rank saw the signal; run the same
      command again (Slurm: `scontrol requeue`) to resume. 75 is EX_TEMPFAIL of sysexits.h.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
REQUEUE_EXIT_CODE = 75

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionFlag:
    """Records that a preemption signal arrived; the handler only sets a flag."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Install the handlers for SIGUSR1 and SIGTERM (main thread only)."""
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the handlers that were there before `install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal_number is None:
            log.warning("received %s; saving a checkpoint at the next step boundary",
                        signal.Signals(signum).name)
        self.signal_number = signum

    @property
    def requested(self) -> bool:
        return self.signal_number is not None
