"""End-to-end protection that does not trust the broker (PyNaCl, AES-GCM): one import for every
envelope kind, each in a module of its own.

* :mod:`~fedjet.codecs.identity`: a party's keys, its peers' and the pair keys (``Boxes``);
  ``sign``/``verify``/``digest``.
* :mod:`~fedjet.codecs.envelope` and :mod:`~fedjet.codecs.opener`: the update envelope
  (version 4), a worker's frame to the coordinator in signed AES-GCM segments, sealed and opened
  as its chunks stream past. :mod:`~fedjet.codecs.legacy` reads versions 1 and 2 for replay.
* :mod:`~fedjet.codecs.secagg_envelope`: secure-aggregation steps, a key domain of their own.
* :mod:`~fedjet.codecs.global_seal`: global versions, one fresh key per version sealed to
  every member; AES-GCM segments sealed as they are published (``STREAMED``), or one
  ``SecretBox`` (``ONE_BOX``, runs recorded before it).
* :mod:`~fedjet.codecs.replay_guard`: per (cloud, worker) sequence numbers must strictly increase.

Pure: keys come in as objects, bytes go out; files live in ``fedjet.keystore``.
"""

from __future__ import annotations

from fedjet.codecs.envelope import (
    ENVELOPE_MAGIC,
    ENVELOPE_OVERHEAD,
    ENVELOPE_VERSION,
    HEADER_BYTES,
    LEGACY_SEGMENTED,
    SALT_BYTES,
    SEGMENT_BYTES,
    SIGNATURE_BYTES,
    TAG_BYTES,
    TRAILER_BYTES,
    SealedUpdate,
    StreamDigest,
    envelope_limit,
    message_cipher,
    seal_update,
    sealed_size,
    segment_nonce,
    update_signed_message,
)
from fedjet.codecs.global_seal import (
    ONE_BOX,
    STREAMED,
    SealedGlobal,
    StreamedGlobal,
    StreamedSeal,
    open_global,
    open_secret,
    open_streamed,
    open_version_key,
    seal_global,
    seal_global_streamed,
)
from fedjet.codecs.identity import (
    COORDINATOR,
    MAX_SENDER_BYTES,
    Boxes,
    Identity,
    PublicIdentity,
    digest,
    sign,
    verify,
)
from fedjet.codecs.opener import UpdateOpener, envelope_sender, open_update
from fedjet.codecs.replay_guard import MAX_WORKERS_PER_CLOUD, ReplayGuard
from fedjet.codecs.secagg_envelope import SECAGG_MAGIC, SECAGG_VERSION, open_secagg, seal_secagg

_message_cipher = message_cipher  # the names tests that build envelopes by hand use
_nonce = segment_nonce

__all__ = [
    "COORDINATOR",
    "ENVELOPE_MAGIC",
    "ENVELOPE_OVERHEAD",
    "ENVELOPE_VERSION",
    "HEADER_BYTES",
    "LEGACY_SEGMENTED",
    "MAX_SENDER_BYTES",
    "MAX_WORKERS_PER_CLOUD",
    "ONE_BOX",
    "SALT_BYTES",
    "SECAGG_MAGIC",
    "SECAGG_VERSION",
    "SEGMENT_BYTES",
    "SIGNATURE_BYTES",
    "STREAMED",
    "TAG_BYTES",
    "TRAILER_BYTES",
    "Boxes",
    "Identity",
    "PublicIdentity",
    "ReplayGuard",
    "SealedGlobal",
    "SealedUpdate",
    "StreamDigest",
    "StreamedGlobal",
    "StreamedSeal",
    "UpdateOpener",
    "digest",
    "envelope_limit",
    "envelope_sender",
    "message_cipher",
    "open_global",
    "open_secagg",
    "open_secret",
    "open_streamed",
    "open_update",
    "open_version_key",
    "seal_global",
    "seal_global_streamed",
    "seal_secagg",
    "seal_update",
    "sealed_size",
    "segment_nonce",
    "sign",
    "update_signed_message",
    "verify",
]
