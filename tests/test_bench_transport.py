"""``fedjet bench transport`` moves a sealed update through a real nats-server and reports the
ratio to raw publishes measured in the same run (the 400 MB figure lives in the README)."""

from __future__ import annotations

import json

from fedjet.models.build import initial_model, parameter_tensors
from tests.conftest import run_fedjet


def test_bench_transport_prints_same_run_ratios_and_the_update_arrives_intact():
    result = run_fedjet(
        "bench", "transport", "--mb", "2", "--repeats", "1", "--coordinator-model", "tiny", "--json", timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["intact"] is True and out["mb"] == 2.0  # every leg's reader hashed all 2 MB
    assert len(out["runs"]["raw"]) == len(out["runs"]["fedjet"]) == 1  # one run of each leg
    assert all(r > 0 for leg in out["runs"].values() for r in leg) and out["ratio_to_raw"] > 0
    assert out["peak_rss_mb"] >= out["baseline_rss_mb"] > 0 and out["raw_reader_peak_rss_mb"] > 0
    # the second figure: a real coordinator took one dense update of the tiny model to version 1
    coordinator = out["coordinator"]
    tiny = parameter_tensors(initial_model("tiny", vocab_size=257, eos_id=256, seed=0))
    numel = sum(t.numel() for t in tiny.values())
    assert coordinator["model"] == "tiny" and coordinator["update_mb"] > 4 * numel / 1e6  # float32 and the envelope
    assert coordinator["peak_rss_mb"] > 0 and coordinator["seconds_to_version_1"] > 0


def test_bench_transport_refuses_a_size_below_one_mb():
    result = run_fedjet("bench", "transport", "--mb", "0", timeout=60)
    assert result.returncode != 0 and "--mb" in result.stderr
    result = run_fedjet("bench", "transport", "--repeats", "0", timeout=60)
    assert result.returncode != 0 and "--repeats" in result.stderr


SERVER_MAX_PENDING = 64 << 20  # nats-server's default max_pending per client


def test_one_fetch_never_asks_for_more_bytes_than_the_client_keeps_pending():
    """A batch of 64 messages of 8 MiB (512 MiB) overflowed nats-py's 256 MiB pending limit: the
    client dropped them as a slow consumer and JetStream held them for its hour-long ack wait. A
    fetch of 64 MiB then still got a busy coordinator cut off by the server (its max_pending)."""
    from nats.js.client import DEFAULT_JS_SUB_PENDING_BYTES_LIMIT

    from fedjet.broker.subjects import JobSubjects
    from fedjet.channel.updates import UpdateInbox

    for max_payload in (1 << 20, 8 << 20, 64 << 20):
        inbox = UpdateInbox(None, JobSubjects("j"), max_blob_bytes=1 << 30, max_payload=max_payload)
        assert inbox.fetch_batch >= 1
        assert inbox.fetch_batch * max_payload <= DEFAULT_JS_SUB_PENDING_BYTES_LIMIT // 2
        if max_payload <= 8 << 20:  # and half of what nats-server lets one client fall behind by
            assert inbox.fetch_batch * max_payload <= SERVER_MAX_PENDING // 2
