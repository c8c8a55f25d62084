"""Admission, written once: open -> anti-replay -> validate -> contribution -> staleness.

Pure (no I/O): the live coordinator, ``fedjet replay`` and the tests call this same code, so
what is admitted live is exactly what replay re-admits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedjet.codecs.crypto import Boxes, ReplayGuard
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import Update, open_sealed_update, read_opened_update
from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.coordinator.strategies import Applied, strategy_for
from fedjet.coordinator.validate import to_contribution
from fedjet.errors import AuthenticationError
from fedjet.spec import JobSpec


@dataclass(frozen=True)
class Admitted:
    update: Update
    applied: Applied

    @property
    def contribution(self) -> Contribution:
        return self.applied.contribution


@dataclass(frozen=True)
class Admission:
    """The fixed context of admission: the job, the keys, the size limits. ``legacy_envelopes``
    also reads envelopes of versions 1-3 (replaying a store recorded before updates were
    signed: such updates prove nothing about who sent them)."""

    spec: JobSpec
    boxes: Boxes
    limits: Limits = field(default_factory=Limits)
    legacy_envelopes: bool = False

    def admit(
        self,
        envelope: bytes,
        subject_cloud: str,
        weights: Weights,
        staleness_of: Callable[[int], int],
        guard: ReplayGuard | None = None,
    ) -> Admitted:
        """An update that arrived on ``subject_cloud``'s subject, ready to batch, or a typed
        :class:`~fedjet.errors.FedjetError` saying why not. ``staleness_of`` maps its base
        version to its staleness (raising when it must be dropped); ``guard`` None skips
        anti-replay (replay re-admits updates that were accepted once already)."""
        return self.check(self.open(envelope, subject_cloud, guard), subject_cloud, weights, staleness_of)

    def open(self, envelope: bytes, subject_cloud: str, guard: ReplayGuard | None = None) -> Update:
        """Authenticate (only a member cloud's key on its own subject is even tried) and check
        the sequence number. Whatever happens next, this sequence number is spent."""
        update = open_sealed_update(
            envelope, self.boxes, subject_cloud, self.limits, members=self.spec.clouds, legacy=self.legacy_envelopes
        )
        return self._spend(update, guard)

    def read(self, frame: bytes, subject_cloud: str, guard: ReplayGuard | None = None) -> Update:
        """What :meth:`open` does, for a frame the inbox opened already with the key of the
        cloud whose subject carried it (and only that key)."""
        if subject_cloud not in self.spec.clouds:
            raise AuthenticationError(f"update from {subject_cloud!r}, which may not send updates here")
        return self._spend(read_opened_update(frame, subject_cloud, self.limits), guard)

    def _spend(self, update: Update, guard: ReplayGuard | None) -> Update:
        if guard is not None:
            guard.check(update.header.cloud, update.header.worker, update.header.seq)
        return update

    def check(
        self, update: Update, subject_cloud: str, weights: Weights, staleness_of: Callable[[int], int]
    ) -> Admitted:
        """Validate an authenticated update's claims and tensors and place it in time."""
        kind = strategy_for(self.spec.strategy).update_kind
        contribution = to_contribution(update, subject_cloud, self.spec, kind, weights)
        return Admitted(update, Applied(contribution, staleness_of(update.header.base_version)))
