"""Aggregation rules against hand-computed numbers (paper formulas 1-4, FedBuff)."""

from __future__ import annotations

import math

import pytest
import torch

from fedjet.codecs.sparse import SparseTensor
from fedjet.coordinator import aggregate as agg
from fedjet.coordinator.aggregate import Contribution, Staleness
from fedjet.coordinator.server_opt import ServerOptConfig, ServerOptimizer
from fedjet.coordinator.strategies import Aggregator, Applied, StrategyConfig
from fedjet.errors import AggregationError, ConfigError, NonFiniteError, StaleUpdateError


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


W0 = {"a": t(1.0, 2.0), "b": t(0.5)}


def part(cloud: str, samples: int, loss: float, a: torch.Tensor, b: torch.Tensor | None = None, base: int = 0):
    tensors = {"a": a} if b is None else {"a": a, "b": b}
    return Contribution(cloud, base, samples, loss, tensors)


def test_fedavg_weights_models_by_sample_count():
    # deltas: w1 = w0 + (1, 1), w2 = w0 + (4, -2); n = 1, 3  ->  w = w0 + (1*1+3*4)/4, (1*1-3*2)/4
    parts = [part("x", 1, 0.0, t(1.0, 1.0)), part("y", 3, 0.0, t(4.0, -2.0))]
    aggr = Aggregator(StrategyConfig(name="fedavg"), dict(W0))
    new = aggr.apply([Applied(p, 0) for p in parts])
    assert torch.allclose(new["a"], t(1.0 + 13 / 4, 2.0 - 5 / 4))
    assert torch.equal(new["b"], t(0.5))  # a tensor nobody changed stays put
    assert aggr.version == 1


def test_fedavg_equals_weighted_average_of_full_models():
    w1, w2 = {"a": t(3.0, 0.0), "b": t(1.0)}, {"a": t(0.0, 6.0), "b": t(-1.0)}
    deltas = [{k: w[k] - W0[k] for k in W0} for w in (w1, w2)]
    parts = [Contribution("x", 0, 2, 0.0, deltas[0]), Contribution("y", 0, 6, 0.0, deltas[1])]
    new = Aggregator(StrategyConfig(name="fedavg"), dict(W0)).apply([Applied(p, 0) for p in parts])
    expected = {k: 0.25 * w1[k] + 0.75 * w2[k] for k in W0}
    for k in W0:
        assert torch.allclose(new[k], expected[k])


def test_dynamic_weights_are_softmax_of_negative_loss():
    parts = [part("x", 1, 1.0, t(1.0, 0.0)), part("y", 1, 2.0, t(0.0, 1.0))]
    w = agg.loss_weights(parts, temperature=1.0)
    e1, e2 = math.exp(-1.0), math.exp(-2.0)
    assert w == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2)])
    new = Aggregator(StrategyConfig(name="dynamic"), dict(W0)).apply([Applied(p, 0) for p in parts])
    assert torch.allclose(new["a"], t(1.0 + w[0], 2.0 + w[1]))
    # temperature 2 flattens the weights: softmax(-L/2)
    w2 = agg.loss_weights(parts, temperature=2.0)
    assert w2[0] == pytest.approx(math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1.0)))


def test_gradient_rule_steps_against_weighted_gradient():
    # w <- w - eta * sum(n_i/n g_i), eta = 0.1, n = (1, 1)
    parts = [part("x", 1, 0.0, t(2.0, 0.0)), part("y", 1, 0.0, t(0.0, 4.0))]
    cfg = StrategyConfig(name="gradient", server=ServerOptConfig(lr=0.1))
    new = Aggregator(cfg, dict(W0)).apply([Applied(p, 0) for p in parts])
    assert torch.allclose(new["a"], t(1.0 - 0.1 * 1.0, 2.0 - 0.1 * 2.0))


def test_async_mixes_with_staleness_weight_against_the_base_version():
    cfg = StrategyConfig(name="async", alpha=0.5, staleness=Staleness(kind="polynomial", a=1.0))
    aggr = Aggregator(cfg, dict(W0))
    first = part("x", 1, 0.0, t(2.0, 2.0), base=0)  # w_1 = w0 + 0.5 * (w0 + d - w0) = (2, 3)
    aggr.apply([Applied(first, aggr.admissible(0))])
    assert torch.allclose(aggr.weights["a"], t(2.0, 3.0))
    # a stale update from version 0: tau = 1, s = 1/2, w_i = w0 + d = (1, 2) + (0, 4) = (1, 6)
    stale = part("y", 1, 0.0, t(0.0, 4.0), base=0)
    tau = aggr.admissible(0)
    assert tau == 1
    aggr.apply([Applied(stale, tau)])
    # w_2 = w_1 + 0.5 * 0.5 * (w_i - w_1) = (2, 3) + 0.25 * (-1, 3)
    assert torch.allclose(aggr.weights["a"], t(1.75, 3.75))


def test_async_drops_updates_beyond_max_staleness():
    cfg = StrategyConfig(name="async", max_staleness=1)
    aggr = Aggregator(cfg, dict(W0))
    for _ in range(2):
        aggr.apply([Applied(part("x", 1, 0.0, t(0.0, 0.0), base=aggr.version), 0)])
    with pytest.raises(StaleUpdateError):
        aggr.admissible(0)
    with pytest.raises(StaleUpdateError):
        aggr.admissible(5)  # from the future


def test_fedbuff_applies_mean_of_staleness_weighted_deltas():
    cfg = StrategyConfig(name="fedbuff", staleness=Staleness(kind="hinge", a=1.0, b=0), server=ServerOptConfig(lr=2.0))
    parts = [Applied(part("x", 1, 0.0, t(1.0, 0.0)), 0), Applied(part("y", 1, 0.0, t(0.0, 3.0)), 2)]
    new = Aggregator(cfg, dict(W0)).apply(parts)
    # s(0) = 1, s(2) = 1/(1*2+1) = 1/3 ; mean = ((1, 0) + (0, 1)) / 2 ; eta_g = 2
    assert torch.allclose(new["a"], t(1.0 + 1.0, 2.0 + 1.0))


def test_staleness_functions():
    assert Staleness(kind="constant")(7) == 1.0
    assert Staleness(kind="polynomial", a=0.5)(3) == pytest.approx(0.5)
    hinge = Staleness(kind="hinge", a=10.0, b=4)
    assert hinge(4) == 1.0 and hinge(5) == pytest.approx(1 / 11)
    with pytest.raises(ConfigError):
        Staleness(kind="exponential")


def test_server_optimizers_match_hand_computed_steps():
    w, g = {"a": t(1.0)}, {"a": t(0.5)}
    assert ServerOptimizer(ServerOptConfig(name="sgd", lr=0.1)).step(w, g)["a"].item() == pytest.approx(0.95)
    nesterov = ServerOptimizer(ServerOptConfig(name="nesterov", lr=0.1, momentum=0.9))
    w1 = nesterov.step(w, g)  # buf = 0.5 ; dir = 0.5 + 0.9 * 0.5 = 0.95
    assert w1["a"].item() == pytest.approx(1.0 - 0.095)
    w2 = nesterov.step(w1, g)  # buf = 0.9*0.5+0.5 = 0.95 ; dir = 0.5 + 0.855
    assert w2["a"].item() == pytest.approx(0.905 - 0.1 * 1.355)
    adam = ServerOptimizer(ServerOptConfig(name="adam", lr=0.01, eps=0.0))
    assert adam.step(w, g)["a"].item() == pytest.approx(0.99)  # first Adam step moves lr*sign(g)


def test_sparse_contributions_add_only_kept_entries():
    sparse = SparseTensor((2,), torch.tensor([1]), t(4.0))
    parts = [Contribution("x", 0, 1, 0.0, {"a": sparse}), part("y", 1, 0.0, t(2.0, 0.0))]
    new = Aggregator(StrategyConfig(name="fedavg"), dict(W0)).apply([Applied(p, 0) for p in parts])
    assert torch.allclose(new["a"], t(1.0 + 1.0, 2.0 + 2.0))


def test_same_inputs_give_the_same_hash_and_order_is_respected():
    def run() -> list[str]:
        gen = torch.Generator().manual_seed(3)
        w = {"a": torch.randn(64, generator=gen), "b": torch.randn(8, 8, generator=gen)}
        aggr = Aggregator(StrategyConfig(name="fedavg"), w)
        hashes = []
        for r in range(3):
            parts = [
                Contribution(c, r, 10 + i, 1.0, {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in w.items()})
                for i, c in enumerate("xyz")
            ]
            aggr.apply([Applied(p, 0) for p in parts])
            hashes.append(aggr.hash)
        return hashes

    assert run() == run()
    assert len(set(run())) == 3


@pytest.mark.parametrize("name", ["nesterov", "adam"])
def test_a_refused_non_finite_batch_leaves_the_server_optimizer_as_it_was(name):
    """The state a refused step touched comes back and the state it created goes, while the
    state of tensors it did not name (another fragment's) is never copied or changed."""
    from fedjet.errors import NonFiniteError

    server = ServerOptConfig(name=name, lr=0.1)
    aggregator = Aggregator(StrategyConfig(server=server), {"a": t(1.0, 2.0), "b": t(0.5)}, clouds=1)
    aggregator.apply([Applied(part("aws", 1, 1.0, t(0.1, 0.1)), 0)])  # state for "a" only
    before = {n: {k: v.clone() for k, v in s.items()} for n, s in aggregator.optimizer.state.items()}
    steps, weights = aggregator.optimizer.steps, dict(aggregator.weights)
    poison = Applied(part("aws", 1, 1.0, t(0.1, 0.1), t(float("inf"))), 0)
    with pytest.raises(NonFiniteError):
        aggregator.apply([poison])
    assert aggregator.optimizer.steps == steps and aggregator.weights == weights
    assert set(aggregator.optimizer.state) == {"a"}  # "b"'s state, created by the refused step, is gone
    for key, value in before["a"].items():
        assert torch.equal(aggregator.optimizer.state["a"][key], value)


def _random_parts(seed: int, count: int = 4) -> list[Contribution]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Contribution(f"c{i}", 0, int(torch.randint(1, 50, (1,), generator=gen)), 0.0,
                     {"a": torch.randn(2, generator=gen), "b": torch.randn(1, generator=gen)})
        for i in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize("server", [ServerOptConfig(), ServerOptConfig(name="sgd", lr=0.7)])
def test_a_running_sum_is_fedavg_folded_one_update_at_a_time(server):
    parts = _random_parts(3)
    held = Aggregator(StrategyConfig(name="fedavg", server=server), dict(W0)).apply([Applied(p, 0) for p in parts])
    live = Aggregator(StrategyConfig(name="fedavg", server=server), dict(W0))
    for p in parts:  # as updates arrive: each one taken in, its tensors free to go
        live.check_fold(Applied(p, 0))
        live.fold(Applied(p, 0))
    folded = live.close_round()
    for k in W0:
        assert torch.allclose(folded[k], held[k], atol=1e-6)  # the same rule ...
    replayed = Aggregator(StrategyConfig(name="fedavg", server=server), dict(W0))
    replayed.apply([Applied(p, 0) for p in parts], running=True)  # ... and replay sums it the same way, bit for bit
    assert replayed.hash == live.hash and live.version == 1
    again = Aggregator(StrategyConfig(name="fedavg", server=server), dict(W0))
    again.apply([Applied(p, 0) for p in reversed(parts)], running=True)
    assert all(torch.allclose(again.weights[k], folded[k], atol=1e-6) for k in W0)


def test_a_running_sum_refuses_what_it_cannot_weigh_and_what_would_not_be_finite():
    live = Aggregator(StrategyConfig(name="fedavg"), dict(W0))
    with pytest.raises(NonFiniteError):
        live.check_fold(Applied(part("x", 2, 0.0, t(float("inf"), 0.0)), 0))
    with pytest.raises(AggregationError, match="no samples"):
        live.fold(Applied(part("x", 0, 0.0, t(1.0, 0.0)), 0))
    with pytest.raises(StaleUpdateError):  # nothing taken in: no version
        live.close_round()
    live = Aggregator(StrategyConfig(name="fedavg", clip_update=0), dict(W0))  # no clipping to save it
    huge = t(3e38, 0.0)  # finite alone, a sum that is not: the round makes no version and changes nothing
    for cloud in ("x", "y"):
        live.check_fold(Applied(part(cloud, 1, 0.0, huge), 0))
        live.fold(Applied(part(cloud, 1, 0.0, huge), 0))
    with pytest.raises(NonFiniteError):
        live.close_round()
    assert live.version == 0 and torch.equal(live.weights["a"], W0["a"])
    for name in ("dynamic", "gradient"):
        other = Aggregator(StrategyConfig(name=name), dict(W0))
        assert not other.can_fold()
        with pytest.raises(AggregationError):
            other.fold(Applied(part("x", 1, 0.0, t(1.0, 0.0)), 0))
    assert Applied(part("x", 1, 0.0, t(1.0, 0.0)), 2).folded() == Applied(Contribution("x", 0, 1, 0.0, {}), 2)


def test_plain_sgd_writing_over_the_pseudo_gradient_gives_the_same_bits():
    gen = torch.Generator().manual_seed(5)
    weights = {"a": torch.randn(10_000, generator=gen), "b": torch.randn(77, generator=gen)}
    for lr in (1.0, 0.7, 0.1234567):
        grad = {n: torch.randn(w.shape, generator=gen) * 1e-3 for n, w in weights.items()}
        kept = ServerOptimizer(ServerOptConfig(name="sgd", lr=lr)).step(weights, grad)
        given = {n: g.clone() for n, g in grad.items()}  # the caller's to give up
        spent = ServerOptimizer(ServerOptConfig(name="sgd", lr=lr)).step(weights, given, consume=True)
        assert all(torch.equal(kept[n], spent[n]) for n in weights)
