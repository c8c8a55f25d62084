"""Admission, written once: authenticate -> anti-replay -> privacy -> validate -> staleness.

Pure (no I/O): the live coordinator, ``fedjet replay`` and the tests call this same code, so
what is admitted live is exactly what replay re-admits. Every per-update check is here, and its
state comes in from the caller: the :class:`ReplayGuard` (sequence numbers) when the update is
authenticated, the :class:`PrivacyBudget` (DP steps per cloud) when it is checked.

The stages, one type each: an authenticated :class:`Update` (:meth:`Admission.open` for an
envelope, :meth:`Admission.read` for a frame the inbox opened), then :meth:`Admission.check`,
the one call live and replay both admit through, gives the :class:`Admitted` update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fedjet.codecs.crypto import Boxes, ReplayGuard
from fedjet.codecs.frame import Limits
from fedjet.codecs.messages import Update, UpdateHeader, open_sealed_update, read_opened_update
from fedjet.coordinator.aggregate import Contribution, Weights
from fedjet.coordinator.privacy_check import PrivacyBudget
from fedjet.coordinator.strategies import Applied, strategy_for
from fedjet.coordinator.validate import check_claims, to_contribution
from fedjet.errors import AuthenticationError, ValidationError
from fedjet.spec import JobSpec


@dataclass(frozen=True)
class Admitted:
    """An update that passed every check: as it was sent, and as the aggregator will apply it."""

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
        budget: PrivacyBudget | None = None,
    ) -> Admitted:
        """:meth:`open` then :meth:`check`: an envelope that arrived on ``subject_cloud``'s
        subject, ready to batch, or a typed :class:`~fedjet.errors.FedjetError` saying why not."""
        return self.check(self.open(envelope, subject_cloud, guard), subject_cloud, weights, staleness_of, budget)

    def open(self, envelope: bytes, subject_cloud: str, guard: ReplayGuard | None = None) -> Update:
        """Authenticate (only a member cloud's key on its own subject is even tried) and check
        the sequence number. Whatever happens next, this sequence number is spent. ``guard``
        None skips anti-replay (replay re-admits updates that were accepted once already)."""
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
        self,
        update: Update,
        subject_cloud: str,
        weights: Weights,
        staleness_of: Callable[[int], int],
        budget: PrivacyBudget | None = None,
    ) -> Admitted:
        """Every check of an authenticated update: its privacy claim against its cloud's
        ``budget`` (charged when it holds), its claims and tensors, and its place in time
        (``staleness_of`` maps its base version to its staleness, raising when it must be
        dropped). ``budget`` None checks the claim against a budget nothing was charged to."""
        self._charge(update.header, budget)
        kind = strategy_for(self.spec.strategy).update_kind
        contribution = to_contribution(update, subject_cloud, self.spec, kind, weights)
        return Admitted(update, Applied(contribution, staleness_of(update.header.base_version)))

    def check_header(self, header: UpdateHeader, budget: PrivacyBudget | None = None) -> None:
        """A secure round's update, of which the coordinator only sees the header (its sender
        is checked by the round): the same checks of its kind, claims and privacy claim."""
        spec = self.spec
        if header.kind != spec.update_kind:
            raise ValidationError(f"strategy {spec.strategy.name} takes {spec.update_kind} updates, got {header.kind}")
        check_claims(header, spec)
        self._charge(header, budget)

    def _charge(self, header: UpdateHeader, budget: PrivacyBudget | None) -> None:
        (budget if budget is not None else PrivacyBudget()).charge(header, self.spec.config.dp_config)
