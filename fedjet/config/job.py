"""The job's configuration: one frozen, keyword-only dataclass tree, defaults in one place.

``JobConfig`` nests the strategy (with its staleness function and server optimizer), the
round policy, local training, partitioning and stop conditions. Every part validates itself in
``__post_init__``; the CLI flags and ``job.toml`` are two front doors to the same tree (see
:mod:`fedjet.config.flags`), and the job spec carries it typed. No torch here: a wrong value
is refused before any process starts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from fedjet.config.codec import CodecSpec
from fedjet.config.names import check_token
from fedjet.config.peft import LoraSpec, parse_peft
from fedjet.config.privacy import CentralDPConfig, DPConfig, parse_central_dp, parse_dp
from fedjet.config.secure_agg import SecureAggConfig, parse_secure_agg
from fedjet.config.secure_agg import check_job as check_secure_agg
from fedjet.config.strategy_traits import STRATEGIES as STRATEGIES
from fedjet.config.strategy_traits import traits_of
from fedjet.errors import ConfigError

STALENESS = ("constant", "polynomial", "hinge")
OPTIMIZERS = ("sgd", "nesterov", "adam")
LATE_POLICIES = ("drop", "carry")
PARTITIONS = ("fixed", "noniid", "dynamic")
SCHEDULES = ("wait", "overlap")
ISLAND_POLICIES = ("queue", "accumulate")
ISLAND_PHASES = 10  # default --island-max-steps: this many local phases past the newest version
DEFAULT_CODEC = "lowrank:24+int4+down=lowrank:16+int4"  # see the README's frontier
DEFAULT_ROUNDS = 5


def flag(name: str, help: str = "", **extra: Any) -> dict[str, Any]:
    """Field metadata naming the CLI flag that sets this field (see ``flags.add_config_flags``)."""
    return {"flag": name, "help": help, **extra}


def default_job() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


def default_server_lr(strategy: str) -> float:
    """lr 1 makes SGD reproduce formulas 1, 2 and 4 exactly; gradient steps need a real step size."""
    return traits_of(strategy).default_server_lr


@dataclass(frozen=True, kw_only=True)
class Staleness:
    """s(tau): constant 1; polynomial (1+tau)^-a (FedAsync); hinge 1 until b, then 1/(a(tau-b)+1)."""

    kind: str = field(
        default="polynomial", metadata=flag("--staleness", "staleness function s(tau)", choices=STALENESS)
    )
    a: float = field(default=0.5, metadata=flag("--staleness-a"))
    b: int = field(default=4, metadata=flag("--staleness-b"))

    def __post_init__(self) -> None:
        if self.kind not in STALENESS:
            raise ConfigError(f"staleness must be one of {STALENESS}, got {self.kind!r}")
        if not (self.a >= 0 and math.isfinite(self.a)) or self.b < 0:
            raise ConfigError("staleness parameters a and b must be >= 0")

    def __call__(self, tau: int) -> float:
        if tau < 0:
            raise ConfigError(f"negative staleness {tau}")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + tau) ** (-self.a))
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)


@dataclass(frozen=True, kw_only=True)
class ServerOptConfig:
    """The server optimizer over the aggregated pseudo-gradient; ``lr`` None = the strategy's default."""

    name: str = field(default="sgd", metadata=flag("--server-opt", choices=OPTIMIZERS))
    lr: float | None = field(default=None, metadata=flag("--server-lr", "default 1.0 (0.05 for gradient)"))
    momentum: float = field(default=0.9, metadata=flag("--server-momentum"))
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"server optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"server lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--server-momentum must be in [0, 1), got {self.momentum}")

    @property
    def step_size(self) -> float:
        assert self.lr is not None, "StrategyConfig resolves the default lr"
        return self.lr


@dataclass(frozen=True, kw_only=True)
class StrategyConfig:
    """``--strategy`` and its parameters; recorded in the spec and the report."""

    name: str = field(default="fedavg", metadata=flag("--strategy", "aggregation rule", choices=STRATEGIES))
    temperature: float = field(default=1.0, metadata=flag("--temperature", "dynamic: softmax(-L/T)"))
    alpha: float = field(default=0.6, metadata=flag("--alpha-async", "async: mixing weight alpha"))
    staleness: Staleness = field(default_factory=Staleness)
    max_staleness: int = field(default=8, metadata=flag("--max-staleness"))
    buffer_size: int = field(default=3, metadata=flag("--buffer-size", "fedbuff: K updates per version"))
    server: ServerOptConfig = field(default_factory=ServerOptConfig)
    clip_update: float | None = field(
        default=2.0, metadata=flag("--clip-update", "scale each update down to this x the global's norm (0: off)")
    )

    central_dp: str | None = field(
        default=None,
        metadata=flag("--central-dp", "clip each update, noise the average (DP-FedAvg)", metavar="clip=C,noise=Z"),
    )
    # Parsed once, here: the string above is only the flag and wire form.
    central_dp_config: CentralDPConfig | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        traits = traits_of(self.name)
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"--alpha-async must be in (0, 1], got {self.alpha}")
        if self.max_staleness < 0 or self.buffer_size < 1:
            raise ConfigError("--max-staleness must be >= 0 and --buffer-size >= 1")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.clip_update is not None and not (self.clip_update >= 0 and math.isfinite(self.clip_update)):
            raise ConfigError(f"--clip-update must be >= 0 (0: off), got {self.clip_update}")
        if self.central_dp is not None:
            object.__setattr__(self, "central_dp_config", parse_central_dp(self.central_dp))
            if not traits.averages_clipped_updates:
                raise ConfigError("--central-dp averages clipped updates: use it with fedavg or fedbuff")
        if self.server.lr is None:  # the default that makes formulas 1, 2 and 4 exact
            object.__setattr__(self, "server", replace(self.server, lr=default_server_lr(self.name)))


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    """Sync rounds close when every cloud has reported, or at ``deadline_s`` with ``quorum``."""

    quorum: int | None = field(default=None, metadata=flag("--quorum", "sync: clouds needed once the deadline passes"))
    deadline_s: float | None = field(
        default=None, metadata=flag("--round-deadline", "sync: seconds before a quorum closes")
    )
    late: str = field(default="drop", metadata=flag("--late", "sync: late updates", choices=LATE_POLICIES))

    def __post_init__(self) -> None:
        if self.late not in LATE_POLICIES:
            raise ConfigError(f"--late must be one of {LATE_POLICIES}, got {self.late!r}")
        if self.quorum is not None and self.quorum < 1:
            raise ConfigError(f"--quorum must be >= 1, got {self.quorum}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ConfigError("--round-deadline must be > 0 seconds")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Local optimisation per update; part of the spec, so every cloud trains alike."""

    local_steps: int = field(default=20, metadata=flag("--local-steps"))
    batch_size: int = field(default=8, metadata=flag("--batch-size"))
    seq_len: int = field(default=128, metadata=flag("--seq-len"))
    lr: float = field(default=2e-3, metadata=flag("--lr", "local AdamW learning rate"))
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: str = field(
        default="wait",
        metadata=flag(
            "--schedule",
            "wait: each local phase starts from the newest global; overlap: the next phase trains "
            "while the last update uploads and its version is made and downloaded (one step delayed)",
            choices=SCHEDULES,
        ),
    )

    fragments: int = field(
        default=1,
        metadata=flag(
            "--fragments",
            "streaming fragments: split the model into F parts synchronised one per round, round-robin "
            "(1: the whole model every round)",
        ),
    )
    fragment_alpha: float = field(
        default=0.0,  # measured on the tiny workload: 0 beat Streaming DiLoCo's 0.5 on both seeds tried
        metadata=flag(
            "--fragment-alpha",
            "fragments: a returning fragment moves by (1 - alpha) x (global - as sent), keeping the steps "
            "trained since it was sent (0: the global plus those steps)",
        ),
    )
    island: str | None = field(
        default=None,
        metadata=flag(
            "--island",
            "what a cloud cut off from the hub contributes: queue (every phase's update waits on its leaf) or "
            "accumulate (its phases fold into one update, sent when the link returns); default: queue for "
            "fedbuff and gradient, accumulate for async and the synchronous delta rules",
            choices=ISLAND_POLICIES,
        ),
    )
    island_max_steps: int | None = field(
        default=None,
        metadata=flag(
            "--island-max-steps",
            f"local steps a cut-off cloud trains past its newest version, then waits (default {ISLAND_PHASES} phases)",
        ),
    )

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.fragments < 1:
            raise ConfigError(f"--fragments must be >= 1, got {self.fragments}")
        if not 0 <= self.fragment_alpha < 1:
            raise ConfigError(f"--fragment-alpha must be in [0, 1), got {self.fragment_alpha}")
        if self.island is not None and self.island not in ISLAND_POLICIES:
            raise ConfigError(f"--island must be one of {ISLAND_POLICIES}, got {self.island!r}")
        if self.island_max_steps is not None and self.island_max_steps < 0:
            raise ConfigError(f"--island-max-steps must be >= 0, got {self.island_max_steps}")
        if self.local_steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ConfigError("--local-steps and --batch-size must be >= 1 and --seq-len >= 2")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or not self.grad_clip > 0:
            raise ConfigError("weight_decay must be >= 0 and grad_clip > 0")


@dataclass(frozen=True, kw_only=True)
class PartitionConfig:
    """How ``fedjet up`` deals its one demo corpus, and how often dynamic re-assigns steps."""

    scheme: str = field(default="fixed", metadata=flag("--partition", choices=PARTITIONS))
    alpha: float = field(default=0.5, metadata=flag("--alpha", "noniid: Dirichlet concentration"))
    rebalance_every: int = field(
        default=1, metadata=flag("--rebalance-every", "dynamic: versions between re-assignments")
    )

    def __post_init__(self) -> None:
        if self.scheme not in PARTITIONS:
            raise ConfigError(f"--partition must be one of {PARTITIONS}, got {self.scheme!r}")
        if not self.alpha > 0:
            raise ConfigError(f"--alpha must be > 0, got {self.alpha}")
        if self.rebalance_every < 1:
            raise ConfigError("--rebalance-every must be >= 1")


@dataclass(frozen=True, kw_only=True)
class StopConfig:
    """When the job ends; with neither given it makes ``DEFAULT_ROUNDS`` versions."""

    rounds: int | None = field(
        default=None, metadata=flag("--rounds", f"global versions to make (default {DEFAULT_ROUNDS})")
    )
    max_updates: int | None = field(default=None, metadata=flag("--max-updates", "end once N updates are applied"))

    def __post_init__(self) -> None:
        if self.rounds is None and self.max_updates is None:
            object.__setattr__(self, "rounds", DEFAULT_ROUNDS)
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError("--rounds must be >= 1")
        if self.max_updates is not None and self.max_updates < 1:
            raise ConfigError("--max-updates must be >= 1")

    def reached(self, version: int, applied: int) -> bool:
        if self.max_updates is not None and applied >= self.max_updates:
            return True
        return self.rounds is not None and version >= self.rounds


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything the coordinator and every worker must agree on."""

    job: str = field(default_factory=default_job, metadata=flag("--job", "job name (default: run-<timestamp>)"))
    clouds: tuple[str, ...] = field(default=("aws", "gcp", "azure"), metadata=flag("--clouds", "comma-separated"))
    observers: tuple[str, ...] = field(default=("eval",), metadata=flag("--observers", "read-only members"))
    model: str = field(default="tiny", metadata=flag("--model", "preset (tiny, small, medium) or checkpoint dir"))
    seed: int = field(default=0, metadata=flag("--seed"))
    codec: str = field(
        default=DEFAULT_CODEC, metadata=flag("--codec", "update [+down= view] codec: dense, int2:128+down=int2, ...")
    )
    peft: str | None = field(
        default=None,
        metadata=flag("--peft", "train LoRA adapters only", metavar="lora:r=8,alpha=16[,dropout=P,targets=NAME,..]"),
    )
    dp: str | None = field(
        default=None,
        metadata=flag(
            "--dp", "record-level DP-SGD (noise=S for epsilon=E: report the ε)", metavar="epsilon=E,delta=D,clip=C"
        ),
    )
    secure_agg: str | None = field(
        default=None,
        metadata=flag(
            "--secure-agg", "mask updates: the coordinator sees only their sum", const="on", metavar="threshold=T,.."
        ),
    )
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    # The mini-language fields above, parsed once when the config is built (strings only at the
    # flag and wire boundary): everything downstream reads these.
    codec_spec: CodecSpec = field(init=False, repr=False, compare=False)
    peft_spec: LoraSpec | None = field(init=False, default=None, repr=False, compare=False)
    dp_config: DPConfig | None = field(init=False, default=None, repr=False, compare=False)
    secure_agg_config: SecureAggConfig | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_token("job", self.job)
        if not self.clouds:
            raise ConfigError("a job needs at least one cloud (--clouds aws,gcp,azure)")
        if len(set(self.clouds) | set(self.observers)) != len(self.clouds) + len(self.observers):
            raise ConfigError(f"cloud and observer names must be unique: {self.clouds} {self.observers}")
        for name in (*self.clouds, *self.observers):
            check_token("cloud", name)
        if "coordinator" in (*self.clouds, *self.observers):
            raise ConfigError("'coordinator' is reserved; pick another cloud name")
        if self.round.quorum is not None and self.round.quorum > len(self.clouds):
            raise ConfigError(f"--quorum must be in 1..{len(self.clouds)}, got {self.round.quorum}")
        object.__setattr__(self, "codec_spec", CodecSpec.parse(self.codec))
        object.__setattr__(self, "peft_spec", None if self.peft is None else parse_peft(self.peft))
        self._check_privacy()
        if self.secure_agg is not None:
            secure = parse_secure_agg(self.secure_agg)
            object.__setattr__(self, "secure_agg_config", secure)
            check_secure_agg(
                secure,
                strategy=self.strategy.name,
                clouds=len(self.clouds),
                central_dp=self.strategy.central_dp is not None,
                deadline=self.round.quorum is not None or self.round.deadline_s is not None,
                buffer_size=self.strategy.buffer_size,
            )
        rule = traits_of(self.strategy.name)
        self._check_fragments(rule)
        if self.train.island == "accumulate" and rule.update_kind == "gradient":
            raise ConfigError("--island accumulate folds model moves; gradient sends one gradient a phase: use queue")
        overlappable = rule.synchronous and rule.update_kind == "delta"
        if self.train.schedule == "overlap" and (not overlappable or self.secure_agg):
            raise ConfigError(
                "--schedule overlap is for the synchronous delta rules (fedavg, dynamic) without --secure-agg: "
                "async and fedbuff workers never wait for a version, gradient steps need the newest weights, "
                "and secure rounds mask an update against its round's base"
            )

    def _check_fragments(self, rule: Any) -> None:
        """Streaming fragments run, for now, in synchronous delta rounds under a plain server step."""
        if self.train.fragments == 1:
            return
        unsupported = [
            (not (rule.synchronous and rule.update_kind == "delta"), f"--strategy {self.strategy.name}"),
            (self.secure_agg is not None, "--secure-agg"),
            (self.dp is not None, "--dp"),
            (self.strategy.central_dp is not None, "--central-dp"),
            (self.train.schedule != "wait", f"--schedule {self.train.schedule}"),
            (self.strategy.server.name == "adam", "--server-opt adam"),  # its bias correction counts all steps
            (self.round.late == "carry", "--late carry"),  # a carried fragment would share another's average
            (self.codec_spec.down is not None, f"--codec {self.codec} (a +down= view)"),
            (self.peft is not None, "--peft"),
        ]
        named = [what for bad, what in unsupported if bad]
        if named:
            raise ConfigError(
                f"--fragments {self.train.fragments} runs in synchronous fedavg/dynamic rounds (server sgd or "
                f"nesterov, per fragment) with an update codec without a view; not yet with {', '.join(named)}"
            )

    def _check_privacy(self) -> None:
        if self.dp is not None:
            object.__setattr__(self, "dp_config", parse_dp(self.dp))
            rule = traits_of(self.strategy.name)
            if rule.weights_from_losses or rule.update_kind == "gradient":
                raise ConfigError(
                    f"--dp with --strategy {self.strategy.name}: dynamic weights by training losses and gradient "
                    "sends raw gradients, neither covered by DP-SGD; use fedavg, async or fedbuff"
                )


def check_shardable(config: JobConfig) -> None:
    """``--shard`` (FSDP2 inside a cloud) trains the wait schedule's whole-model phases of the
    delta and gradient rules; what it does not run is refused before anything starts."""
    if config.dp_config is not None:
        raise ConfigError("--shard does not run DP-SGD (its per-example gradients need whole weights on every rank)")
    if config.train.schedule != "wait":
        raise ConfigError("--shard runs the wait schedule: the overlap schedule reads the weights while a phase trains")
    if config.train.fragments > 1:
        raise ConfigError("--shard does not stream fragments: a sharded model loads every tensor at once")
