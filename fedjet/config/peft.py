"""``--peft lora:r=8,alpha=16,dropout=0.05[,targets=NAME,NAME]`` as a typed value, parsed once
when the job config is built (torch-free: the config layer must not import peft)."""

from __future__ import annotations

from dataclasses import dataclass

from fedjet.errors import ConfigError

PEFT_KEYS = ("r", "alpha", "dropout", "targets")


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """A validated ``--peft lora:…`` value; ``targets=None`` means the architecture's defaults."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"--peft: r must be a positive integer, got {self.r}")
        if not self.alpha > 0:
            raise ConfigError(f"--peft: alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--peft: dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None and (not self.targets or not all(self.targets)):
            raise ConfigError("--peft: targets must name at least one module")

    def describe(self) -> str:
        """The canonical ``lora:…`` string (for the job spec and ``fedjet.json``)."""
        text = f"lora:r={self.r},alpha={self.alpha:g},dropout={self.dropout:g}"
        return text + (f",targets={','.join(self.targets)}" if self.targets else "")


def parse_peft(text: str) -> LoraSpec:
    """Parse ``lora:r=8,alpha=16,dropout=0.05,targets=c_attn,c_proj`` (every key optional)."""
    method, _, rest = text.strip().partition(":")
    if method != "lora":
        raise ConfigError(f"--peft {text!r}: only 'lora[:key=value,...]' is supported")
    fields: dict[str, list[str]] = {}
    last: str | None = None
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:  # a bare name continues the targets list
            if last != "targets":
                raise ConfigError(f"--peft {text!r}: {item!r} is not key=value")
            fields["targets"].append(item)
            continue
        key = key.strip()
        if key not in PEFT_KEYS:
            raise ConfigError(f"--peft {text!r}: unknown key {key!r}; use {', '.join(PEFT_KEYS)}")
        if key in fields:
            raise ConfigError(f"--peft {text!r}: {key} given twice")
        fields[key], last = [value.strip()], key
    return _spec_from_fields(fields, text)


def _spec_from_fields(fields: dict[str, list[str]], text: str) -> LoraSpec:
    try:
        values: dict[str, object] = {}
        if "r" in fields:
            values["r"] = int(fields["r"][0])
        if "alpha" in fields:
            values["alpha"] = float(fields["alpha"][0])
        if "dropout" in fields:
            values["dropout"] = float(fields["dropout"][0])
    except ValueError as e:
        raise ConfigError(f"--peft {text!r}: {e}") from e
    if "targets" in fields:
        values["targets"] = tuple(fields["targets"])
    return LoraSpec(**values)  # type: ignore[arg-type]
