"""``--codec`` text (``dense``, ``topk:0.01+int8`` ...) parsed into a :class:`CodecSpec`.

It lives with the config, below the codecs, so a bad ``--codec`` is refused before any
process starts; :mod:`fedjet.codecs.pipeline` carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedjet.errors import ConfigError

QUANT_LEVELS = ("int8", "int4")
DEFAULT_CHUNK = 256
MAX_QUANT_CHUNK = 1 << 20


@dataclass(frozen=True)
class CodecSpec:
    """Parsed ``--codec`` text; ``density`` None means every value is sent."""

    text: str
    density: float | None = None
    scope: str = "tensor"
    quant: str = "raw"
    chunk: int = DEFAULT_CHUNK

    @classmethod
    def dense(cls) -> CodecSpec:
        return cls("dense")

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """``dense`` | ``[topk:D[:global]][+int8[:C]|+int4[:C]|+fp16]``."""
        density, scope, quant, chunk = None, "tensor", "raw", DEFAULT_CHUNK
        stages = [s.strip() for s in text.strip().split("+") if s.strip()]
        if not stages:
            raise ConfigError("empty --codec")
        for stage in stages:
            name, *args = stage.split(":")
            if name == "dense" and not args:
                continue
            if name == "topk" and 1 <= len(args) <= 2:
                density = _density(args[0])
                scope = args[1] if len(args) == 2 else "tensor"
                if scope not in ("tensor", "global"):
                    raise ConfigError(f"topk scope must be tensor or global, got {scope!r}")
            elif name in QUANT_LEVELS and len(args) <= 1:
                quant, chunk = name, _chunk(args[0]) if args else DEFAULT_CHUNK
            elif name == "fp16" and not args:
                quant = "f16"
            else:
                raise ConfigError(f"unknown codec stage {stage!r} in --codec {text!r}")
        return cls(_canonical(density, scope, quant, chunk), density, scope, quant, chunk)


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise ConfigError(f"topk density must be a number, got {text!r}") from e
    if not 0 < value <= 1:
        raise ConfigError(f"topk density must be in (0, 1], got {value}")
    return value


def _chunk(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_QUANT_CHUNK:
        raise ConfigError(f"quantization chunk must be an integer in 1..{MAX_QUANT_CHUNK}, got {text!r}")
    return int(text)


def _canonical(density: float | None, scope: str, quant: str, chunk: int) -> str:
    parts = []
    if density is not None:
        parts.append(f"topk:{density:g}" + (":global" if scope == "global" else ""))
    if quant == "f16":
        parts.append("fp16")
    elif quant in QUANT_LEVELS:
        parts.append(quant if chunk == DEFAULT_CHUNK else f"{quant}:{chunk}")
    return "+".join(parts) or "dense"
