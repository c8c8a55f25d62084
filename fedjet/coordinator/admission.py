"""Admission, written once: open -> anti-replay -> validate -> contribution -> staleness.

Pure (no I/O): the live coordinator, ``fedjet replay`` and the tests call this same code, so
what is admitted live is exactly what replay re-admits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedjet.codecs.crypto import Boxes, ReplayGuard
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import Update, open_sealed_update
from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.coordinator.strategies import Applied, strategy_for
from fedjet.coordinator.validate import to_contribution
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
    """The fixed context of admission: the job, the keys, the size limits."""

    spec: JobSpec
    boxes: Boxes
    limits: Limits = field(default_factory=Limits)

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
        update = open_sealed_update(envelope, self.boxes, subject_cloud, self.limits)
        if guard is not None:
            guard.check(update.header.cloud, update.header.worker, update.header.seq)
        kind = strategy_for(self.spec.strategy).update_kind
        contribution = to_contribution(update, subject_cloud, self.spec, kind, weights)
        return Admitted(update, Applied(contribution, staleness_of(update.header.base_version)))
