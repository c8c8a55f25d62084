"""Streaming fragments: the model's exchanged tensors split into F parts of similar size along
module boundaries, each synchronised on its own (fragment k every H steps at offset k·H/F).

Pure: names and sizes in, a plan out. The coordinator makes the plan from version 0 and states
it in the job spec, so every party agrees on it without recomputing anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedjet.errors import ConfigError, ValidationError


@dataclass(frozen=True)
class FragmentPlan:
    """``fragments[k]``: the tensor names of fragment k, in the model's order."""

    fragments: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        names = [n for fragment in self.fragments for n in fragment]
        if not self.fragments or any(not fragment for fragment in self.fragments):
            raise ConfigError("a fragment plan needs at least one fragment and no empty one")
        if len(set(names)) != len(names):
            raise ConfigError("a tensor belongs to exactly one fragment")

    @property
    def count(self) -> int:
        return len(self.fragments)

    def of_version(self, version: int) -> int:
        """The fragment a synchronous round on ``version`` synchronises: round-robin."""
        return version % self.count

    def names(self, fragment: int) -> tuple[str, ...]:
        if not 0 <= fragment < self.count:
            raise ValidationError(f"fragment {fragment} is not one of 0..{self.count - 1}")
        return self.fragments[fragment]

    def phase_steps(self, version: int, local_steps: int, rounds: int | None) -> int:
        """Local steps of the phase whose update goes into the round on ``version``.

        ``local_steps / F`` a round, except in the job's last F rounds (when ``rounds`` is known
        and there are at least 2F): there the round on version R − F takes the steps of all F
        but F − 1, and the last F − 1 rounds one step each. Every fragment is then synchronised
        within F − 1 steps of the end, as the whole model is without fragments, instead of the
        fragments synchronised early in the last cycle missing up to F − 1 phases of progress in
        the final version; each cloud still trains the same steps and sends the same bytes."""
        base = max(1, local_steps // self.count)
        if rounds is None or self.count == 1 or rounds < 2 * self.count or version < rounds - self.count:
            return base
        if version == rounds - self.count:
            return base * self.count - (self.count - 1)
        return 1

    def check_covers(self, names: Sequence[str]) -> None:
        """The plan names every exchanged tensor of the model once (a spec for another model fails)."""
        planned = {n for fragment in self.fragments for n in fragment}
        if planned != set(names):
            missing, extra = sorted(set(names) - planned), sorted(planned - set(names))
            raise ConfigError(f"the fragment plan does not fit this model (missing {missing[:3]}, unknown {extra[:3]})")

    def to_wire(self) -> list[list[str]]:
        return [list(fragment) for fragment in self.fragments]

    @classmethod
    def from_wire(cls, raw: object) -> FragmentPlan:
        if not isinstance(raw, list) or not all(
            isinstance(f, list) and all(isinstance(n, str) for n in f) for f in raw
        ):
            raise ConfigError("a fragment plan is a list of lists of tensor names")
        return cls(tuple(tuple(f) for f in raw))


def module_of(name: str) -> str:
    """The module a tensor belongs to: its name without the last component (``weight``, ``bias``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def plan_fragments(sizes: Mapping[str, int], count: int) -> FragmentPlan:
    """``count`` contiguous fragments of similar size, never cutting a module's tensors apart.

    The model's order is kept (blocks stay together, so a fragment is a run of layers, as in
    Streaming DiLoCo); a module opens the next fragment when its middle lies past the next
    multiple of total/count. Fewer modules than ``count`` is an error: a fragment would be empty.
    """
    if count < 1:
        raise ConfigError(f"--fragments must be >= 1, got {count}")
    modules: dict[str, list[str]] = {}
    for name in sizes:
        modules.setdefault(module_of(name), []).append(name)
    if len(modules) < count:
        raise ConfigError(f"--fragments {count}: the model has only {len(modules)} modules to split")
    total = sum(sizes.values())
    fragments: list[list[str]] = [[]]
    done = 0
    remaining = len(modules)
    for names in modules.values():
        size = sum(sizes[n] for n in names)
        left_to_open = count - len(fragments)
        boundary = total * len(fragments) / count
        # cut before this module when its middle lies past the boundary, or when every module
        # left is needed to give the fragments still to open one module each
        if fragments[-1] and left_to_open > 0 and (done + size / 2 >= boundary or remaining <= left_to_open):
            fragments.append([])
        fragments[-1] += names
        done += size
        remaining -= 1
    return FragmentPlan(tuple(tuple(f) for f in fragments))
