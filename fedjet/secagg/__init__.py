"""Secure aggregation (Bonawitz et al. 2017, double masking): the coordinator learns only the sum.

Pure and synchronous like ``fedjet.codecs``: no asyncio, no NATS. Members weigh themselves
(``WeightRule``), encode their update in fixed point in Z_{2^64} (``FixedPoint``), optionally
over an agreed sparse pattern (``random_k_indices``), and run a ``MemberRound``; the
coordinator runs a ``ServerRound`` and relays the messages, and is not trusted with anything
that could single a member out (see :mod:`fedjet.secagg.protocol`). ``recompute_sum`` and
``average`` replay a recorded ``Transcript``.
"""

from fedjet.secagg.coords import gather, random_k_indices, scatter
from fedjet.secagg.errors import (
    EncodingError,
    OutOfRangeError,
    RevealRefused,
    SecAggAbort,
    SecAggAuthError,
    SecAggError,
    SecAggProtocolError,
    SecAggSchemaError,
    ShareError,
    StaleRoundError,
    StaleShareError,
)
from fedjet.secagg.fixedpoint import FixedPoint, fedavg_weights
from fedjet.secagg.messages import (
    Advertise,
    AdvertiseList,
    Confirm,
    Confirmations,
    MaskedInput,
    MaskedStatement,
    Reveal,
    RoundConfig,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    from_wire,
)
from fedjet.secagg.protocol import MemberRound, Phase, ServerRound
from fedjet.secagg.transcript import Transcript
from fedjet.secagg.unmask import average, recompute_sum
from fedjet.secagg.weights import Weight, WeightRule

__all__ = [
    "Advertise",
    "AdvertiseList",
    "Confirm",
    "Confirmations",
    "EncodingError",
    "FixedPoint",
    "MaskedInput",
    "MaskedStatement",
    "MemberRound",
    "OutOfRangeError",
    "Phase",
    "Reveal",
    "RevealRefused",
    "RoundConfig",
    "SecAggAbort",
    "SecAggAuthError",
    "SecAggError",
    "SecAggProtocolError",
    "SecAggSchemaError",
    "ServerRound",
    "ShareDelivery",
    "ShareError",
    "ShareKeys",
    "StaleRoundError",
    "StaleShareError",
    "Transcript",
    "UnmaskRequest",
    "Weight",
    "WeightRule",
    "average",
    "fedavg_weights",
    "from_wire",
    "gather",
    "random_k_indices",
    "recompute_sum",
    "scatter",
]
