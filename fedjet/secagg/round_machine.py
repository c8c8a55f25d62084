"""The phase bookkeeping both sides of a secure-aggregation round share."""

from __future__ import annotations

import enum

from fedjet.secagg.errors import SecAggAbort, SecAggProtocolError
from fedjet.secagg.messages import RoundConfig


class Phase(enum.StrEnum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    RECEIVE_SHARES = "receive_shares"
    MASK = "mask"
    CONFIRM = "confirm"
    REVEAL = "reveal"
    DONE = "done"
    ABORTED = "aborted"
    FAILED = "failed"


class RoundMachine:
    """Phase bookkeeping shared by both sides."""

    def __init__(self, config: RoundConfig) -> None:
        self.config = config
        self._phase = Phase.ADVERTISE

    @property
    def phase(self) -> Phase:
        return self._phase

    def _expect(self, phase: Phase, action: str) -> None:
        if self._phase is not phase:
            raise SecAggProtocolError(f"cannot {action} in phase {self._phase} (round {self.config.round_id})")

    def _abort(self, stage: str, have: int) -> SecAggAbort:
        self._phase = Phase.ABORTED
        return SecAggAbort(stage, have, self.config.threshold)
