"""``--codec`` text (``dense``, ``topk:0.01+int8`` ...) parsed into a :class:`CodecSpec`.

It lives with the config, below the codecs, so a bad ``--codec`` is refused before any
process starts; :mod:`fedjet.codecs.pipeline` carries it out.

Grammar: ``UP[+down[=DOWN]]``. ``UP`` and ``DOWN`` are ``dense`` or
``[topk:D[:global][:warmup=D0/R]|lowrank:R][+int8[:C]|+int4[:C]|+int2[:C]|+int1[:C]|+fp16]``.
``lowrank:R`` sends each matrix as rank-R factors (:mod:`fedjet.codecs.lowrank`).
``warmup=D0/R`` starts top-k at density ``D0`` and decays it geometrically to ``D`` over the
first ``R`` versions (Deep Gradient Compression's warm-up: early updates do not survive 1 %).
``+down`` makes the coordinator publish each global version to the workers compressed the same
way (``+down=DOWN``: another way), with error feedback on its side (:mod:`fedjet.codecs.downlink`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedjet.errors import ConfigError

QUANT_LEVELS = ("int8", "int4", "int2", "int1")
DEFAULT_CHUNK = 256
MAX_QUANT_CHUNK = 1 << 20
MAX_RANK = 4096
DOWN = "down"


@dataclass(frozen=True, kw_only=True)
class Warmup:
    """Top-k density starts at ``start`` and reaches the target after ``versions`` versions."""

    start: float
    versions: int


@dataclass(frozen=True, kw_only=True)
class CodecSpec:
    """Parsed ``--codec`` text; ``density`` None means every value is sent; ``down`` None means
    global versions go to workers losslessly."""

    text: str
    density: float | None = None
    scope: str = "tensor"
    quant: str = "raw"
    chunk: int = DEFAULT_CHUNK
    warmup: Warmup | None = None
    rank: int | None = None
    down: CodecSpec | None = None

    @classmethod
    def dense(cls) -> CodecSpec:
        return cls(text="dense")

    @classmethod
    def parse(cls, text: str) -> CodecSpec:
        """``UP[+down[=DOWN]]`` (see the module docstring)."""
        up_text, marker, down_text = text.strip().partition(f"+{DOWN}")
        if marker and down_text and not down_text.startswith("="):
            raise ConfigError(f"unknown codec stage in --codec {text!r}: write +down or +down=CODEC")
        up = cls._parse_one(up_text, text)
        if not marker:
            return up
        down = up if not down_text else cls._parse_one(down_text[1:], text)  # a second +down: unknown stage
        return replace(up, text=f"{up.text}+{DOWN}={down.text}", down=down)

    @classmethod
    def _parse_one(cls, text: str, whole: str) -> CodecSpec:
        density, scope, warmup, quant, chunk, rank = None, "tensor", None, "raw", DEFAULT_CHUNK, None
        stages = [s.strip() for s in text.strip().split("+") if s.strip()]
        if not stages:
            raise ConfigError(f"empty codec in --codec {whole!r}")
        for stage in stages:
            name, *args = stage.split(":")
            if name == "dense" and not args:
                continue
            if name == "topk" and 1 <= len(args) <= 3:
                density = _density(args[0])
                scope, warmup = _topk_options(args[1:], density)
            elif name == "lowrank" and len(args) == 1:
                rank = _rank(args[0])
            elif name in QUANT_LEVELS and len(args) <= 1:
                quant, chunk = name, _chunk(args[0]) if args else DEFAULT_CHUNK
            elif name == "fp16" and not args:
                quant = "f16"
            else:
                raise ConfigError(f"unknown codec stage {stage!r} in --codec {whole!r}")
        if rank is not None and density is not None:
            raise ConfigError(f"--codec {whole!r}: topk and lowrank are two ways to shrink an update; pick one")
        canonical = ("" if rank is None else f"lowrank:{rank}+") + _canonical(density, scope, warmup, quant, chunk)
        canonical = canonical.removesuffix("+dense")
        return cls(text=canonical, density=density, scope=scope, quant=quant, chunk=chunk, warmup=warmup, rank=rank)

    def density_at(self, version: int) -> float | None:
        """Top-k density for an update made from (or a view of) ``version``: a pure function of
        it, so every party and every replay agrees."""
        if self.density is None or self.warmup is None or version >= self.warmup.versions:
            return self.density
        start, fraction = self.warmup.start, max(version, 0) / self.warmup.versions
        return float(start * (self.density / start) ** fraction)

    def at(self, version: int) -> CodecSpec:
        """This codec with the density it has at ``version`` (text unchanged)."""
        if self.warmup is None:
            return self
        return replace(self, density=self.density_at(version), warmup=None)

    @property
    def lossless(self) -> bool:
        return self.density is None and self.rank is None and self.quant == "raw"


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise ConfigError(f"topk density must be a number, got {text!r}") from e
    if not 0 < value <= 1:
        raise ConfigError(f"topk density must be in (0, 1], got {value}")
    return value


def _topk_options(args: list[str], density: float) -> tuple[str, Warmup | None]:
    scope, warmup = "tensor", None
    for arg in args:
        if arg in ("tensor", "global"):
            scope = arg
        elif arg.startswith("warmup="):
            warmup = _warmup(arg.removeprefix("warmup="), density)
        else:
            raise ConfigError(f"topk option must be tensor, global or warmup=D0/R, got {arg!r}")
    return scope, warmup


def _warmup(text: str, density: float) -> Warmup:
    start, _, versions = text.partition("/")
    value = _density(start)
    if not versions.isdigit() or int(versions) < 1:
        raise ConfigError(f"topk warmup=D0/R needs R >= 1 versions, got {text!r}")
    if value < density:
        raise ConfigError(f"topk warmup starts at {value}, below the target density {density}")
    return Warmup(start=value, versions=int(versions))


def _rank(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_RANK:
        raise ConfigError(f"lowrank rank must be an integer in 1..{MAX_RANK}, got {text!r}")
    return int(text)


def _chunk(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_QUANT_CHUNK:
        raise ConfigError(f"quantization chunk must be an integer in 1..{MAX_QUANT_CHUNK}, got {text!r}")
    return int(text)


def _canonical(density: float | None, scope: str, warmup: Warmup | None, quant: str, chunk: int) -> str:
    parts = []
    if density is not None:
        options = (":global" if scope == "global" else "") + (
            f":warmup={warmup.start:g}/{warmup.versions}" if warmup is not None else ""
        )
        parts.append(f"topk:{density:g}{options}")
    if quant == "f16":
        parts.append("fp16")
    elif quant in QUANT_LEVELS:
        parts.append(quant if chunk == DEFAULT_CHUNK else f"{quant}:{chunk}")
    return "+".join(parts) or "dense"
