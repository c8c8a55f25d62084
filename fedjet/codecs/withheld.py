"""The part of a version record that only the coordinator's key opens.

Every member can open a version record (it travels sealed to all of them), so anything a
member must not learn goes into a libsodium sealed box to the coordinator's X25519 key: each
cloud's training and held-out loss (with three clouds, two could otherwise read the third's),
the round's mean loss, and the key of the version's central-DP noise stream (with it, anyone
could subtract the noise from the published version). ``fedjet replay`` and the report run with
the coordinator's key and see the whole record again. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import replace

import msgpack  # type: ignore[import-untyped]
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from fedjet.codecs.record import MAX_RECORD_BYTES, CoordinatorOnly, VersionRecord, WithheldLoss
from fedjet.config.wire import WireError, from_wire, to_wire
from fedjet.errors import AuthenticationError, DecodeError, SchemaError


def withhold(record: VersionRecord, coordinator: PublicKey, *, noise_key: bytes = b"") -> VersionRecord:
    """The record as members may read it: losses and the noise key sealed to the coordinator."""
    private = CoordinatorOnly(
        noise_key=noise_key,
        losses=tuple(WithheldLoss(loss=c.loss, heldout=c.heldout_loss) for c in record.contributions),
        train_loss=record.train_loss,
    )
    sealed = SealedBox(coordinator).encrypt(msgpack.packb(to_wire(private), use_bin_type=True))
    contributions = tuple(replace(c, loss=0.0, heldout_loss=None) for c in record.contributions)
    return replace(record, contributions=contributions, train_loss=None, coordinator_only=bytes(sealed))


def coordinator_only(record: VersionRecord, coordinator: PrivateKey) -> CoordinatorOnly:
    """Open the withheld part (empty for a record written before it existed)."""
    if not record.coordinator_only:
        return CoordinatorOnly()
    try:
        packed = SealedBox(coordinator).decrypt(record.coordinator_only)
    except CryptoError as e:
        raise AuthenticationError("the record's withheld part is not sealed to this coordinator") from e
    try:
        raw = msgpack.unpackb(packed, raw=False, strict_map_key=True, max_bin_len=MAX_RECORD_BYTES)
        private = from_wire(CoordinatorOnly, raw)
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as e:
        raise DecodeError(f"withheld record part is not msgpack: {type(e).__name__}") from e
    except WireError as e:
        raise SchemaError(f"withheld record part: {e}") from e
    if private.losses and len(private.losses) != len(record.contributions):
        raise SchemaError("the withheld losses do not match the record's contributions")
    return private


def disclosed(record: VersionRecord, coordinator: PrivateKey) -> VersionRecord:
    """The whole record, as the coordinator wrote it before :func:`withhold`."""
    private = coordinator_only(record, coordinator)
    if not private.losses:
        return record
    contributions = tuple(
        replace(c, loss=withheld.loss, heldout_loss=withheld.heldout)
        for c, withheld in zip(record.contributions, private.losses, strict=True)
    )
    return replace(record, contributions=contributions, train_loss=private.train_loss)
