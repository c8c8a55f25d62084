"""Double masking (Bonawitz et al. 2017) as two pure state machines: a member and the server.

Neither does I/O: each method takes the message that arrived and returns the one to send, so
the integrator can carry them over any broker. A method checks the round id first (a message
from another round is a ``StaleRoundError``, never a phase error) and validates everything
before it changes state, so a rejected message (typed error) leaves the round where it was
and the right message can still arrive. ``SecAggAbort`` (below threshold) ends the round for
good; the next round is a new object with fresh keys and a new round id.

Threat model: the coordinator learns only the sum over survivors, as long as fewer than
``threshold`` members collude with it, even when it lies. Each member weighs its own input
(signed in its advertisement), signs the peers it masked against with its masked input, signs
one unmask request per round and reveals only for it, never both secrets of one member, and
only once it holds signatures on that request from ``threshold > n/2`` survivors and every
survivor's statement that it masked against exactly that request's members (the consistency
round of Bonawitz et al., checked with the member's own copy of everyone's key). So a
coordinator can get one request answered at all, and only one whose survivors all masked
against the same members: it learns the sum over those survivors, nothing about any one.

The member is :mod:`~fedjet.secagg.member_round`, the server :mod:`~fedjet.secagg.server_round`.
"""

from __future__ import annotations

from fedjet.secagg.member_round import MemberRound
from fedjet.secagg.round_machine import Phase, RoundMachine
from fedjet.secagg.server_round import ServerRound

__all__ = ["MemberRound", "Phase", "RoundMachine", "ServerRound"]
