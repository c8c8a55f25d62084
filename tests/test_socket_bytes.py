"""Bytes at the socket: what each NATS connection of fedjet counts, and what a report refuses to
make up when a process did not count."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest

from fedjet.broker.connect import connect_client
from fedjet.broker.jetstream import close_quietly, ensure_job_streams
from fedjet.broker.server import EmbeddedNatsServer
from fedjet.broker.socket_bytes import PeakRate, SocketBytes, socket_bytes_of
from fedjet.broker.subjects import JobSubjects
from fedjet.channel.kv import put_stats, read_coordinator_stats, read_stats
from fedjet.errors import BrokerError
from fedjet.lifetime import process_lifetime_s
from fedjet.report import run_bytes
from fedjet.worker.uplink import WorkerStats, idle_fraction

PAYLOAD = 100_000


def test_a_message_costs_its_payload_plus_the_protocol_on_both_sockets(nats_url):
    async def scenario() -> None:
        sender, reader = await connect_client(nats_url, "sender"), await connect_client(nats_url, "reader")
        got: list[int] = []

        async def on_message(msg) -> None:
            got.append(len(msg.data))

        try:
            await reader.subscribe("bytes.test", cb=on_message)
            await reader.flush()
            before_out, before_in = socket_bytes_of(sender).sent, socket_bytes_of(reader).received
            for _ in range(5):
                await sender.publish("bytes.test", b"x" * PAYLOAD)
            await sender.flush()
            for _ in range(100):
                if len(got) == 5:
                    break
                await asyncio.sleep(0.05)
            sent = socket_bytes_of(sender).sent - before_out
            received = socket_bytes_of(reader).received - before_in
            assert got == [PAYLOAD] * 5
            # nats-py's own stats count the payload only; the socket carries the protocol around it
            assert sender.stats["out_bytes"] == 5 * PAYLOAD
            assert 5 * PAYLOAD < sent < 5 * PAYLOAD + 5 * 200
            assert 5 * PAYLOAD < received < 5 * PAYLOAD + 5 * 200
            assert socket_bytes_of(reader).sent > 0  # its SUB, PINGs and flush
        finally:
            await close_quietly(sender)
            await close_quietly(reader)

    asyncio.run(scenario())


def test_counting_goes_on_across_a_reconnect(tmp_path):
    """A restarted server: the same client counts on, on its new transport."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = EmbeddedNatsServer(tmp_path / "a", port=port)
    first.start()

    async def scenario() -> None:
        nc = await connect_client(f"nats://127.0.0.1:{port}", "survivor")
        try:
            await nc.publish("before", b"y" * PAYLOAD)
            await nc.flush()
            sent_before = socket_bytes_of(nc).sent
            first.stop()
            second = EmbeddedNatsServer(tmp_path / "b", port=port)
            second.start()
            try:
                for _ in range(200):
                    if nc.is_connected and nc.stats["reconnects"] >= 1:
                        break
                    await asyncio.sleep(0.05)
                assert nc.stats["reconnects"] >= 1, "the client never reconnected"
                await nc.publish("after", b"z" * PAYLOAD)
                await nc.flush()
                assert socket_bytes_of(nc).sent >= sent_before + PAYLOAD
            finally:
                await close_quietly(nc)
                second.stop()
        finally:
            first.stop()

    asyncio.run(scenario())


def test_a_connection_made_elsewhere_is_refused_rather_than_read_as_zero():
    with pytest.raises(TypeError, match="counts no socket bytes"):
        socket_bytes_of(object())


def test_a_cloud_or_coordinator_without_figures_fails_the_read(nats_url):
    subjects = JobSubjects("figures")

    async def scenario() -> None:
        nc = await connect_client(nats_url, "test")
        try:
            js = nc.jetstream()
            await ensure_job_streams(js, subjects)
            await put_stats(js, subjects, "aws", WorkerStats("aws", lifetime_s=1.0).to_dict())
            assert set(await read_stats(js, subjects, ("aws",))) == {"aws"}
            with pytest.raises(BrokerError, match="gcp reported no figures"):
                await read_stats(js, subjects, ("aws", "gcp"))
            with pytest.raises(BrokerError, match="coordinator reported no figures"):
                await read_coordinator_stats(js, subjects)
        finally:
            await close_quietly(nc)

    asyncio.run(scenario())


def test_run_bytes_sums_every_process_and_refuses_a_missing_counter():
    clouds = {
        "aws": {"bytes_up": 10, "bytes_down": 20, "peak_up_bytes_per_s": 3e6},
        "gcp": {"bytes_up": 1, "bytes_down": 2, "peak_up_bytes_per_s": 5e6},
    }
    processes = {
        "worker-aws": {"socket_in": 25, "socket_out": 14},
        "worker-gcp": {"socket_in": 5, "socket_out": 3},
        "coordinator": {"socket_in": 100, "socket_out": 400},
        "observer": {"socket_in": 300, "socket_out": 7},
    }
    figures = run_bytes(clouds, processes)
    assert (figures["bytes_up"], figures["bytes_down"]) == (11, 22)
    assert figures["socket_bytes"] == 39 + 8 + 500 + 307
    assert figures["socket_bytes_by_process"]["coordinator"] == 500
    assert figures["peak_up_mb_s"] == 5.0  # the fastest any one cloud wrote
    with pytest.raises(KeyError):
        run_bytes({"aws": {"bytes_up": 10}}, processes)
    with pytest.raises(KeyError):
        run_bytes(clouds, {**processes, "observer": {"socket_in": 3}})


def test_idle_is_the_share_of_the_process_lifetime_not_spent_training():
    assert idle_fraction(3.0, 4.0) == pytest.approx(0.25)
    assert idle_fraction(0.0, 10.0) == 1.0  # a worker that never trained was idle all along
    stats = WorkerStats("aws", compute_s=6.0, wait_s=1.0, lifetime_s=8.0).to_dict()
    assert stats["idle_frac"] == pytest.approx(0.25)  # start-up and everything else count, not only waits
    with pytest.raises(ValueError, match="lifetime must be positive"):
        idle_fraction(1.0, 0.0)


def test_the_process_lifetime_counts_from_the_process_start():
    assert 0.0 < process_lifetime_s() < 24 * 3600


def test_the_peak_resident_set_is_this_processs_own_high_water_mark():
    """A fresh process that touches 300 MiB reports a peak that much higher than before it,
    and the figure stays at its high-water mark once the memory is freed."""
    code = (
        "from fedjet.lifetime import peak_rss_mb as p\n"
        "before = p(); block = bytearray(b'x') * (300 << 20); during = p(); del block\n"
        "print(before, during, p())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    before, during, after = map(float, out.stdout.split())
    assert during - before >= 290 and after >= during - 1  # (the kernel syncs its counters lazily)
    assert 0 < before < 1024  # this process's own, not the parent's (ru_maxrss is inherited at fork)


def test_peak_rate_is_the_most_written_in_one_window():
    """Bytes written in bursts: the peak is the burst's window, not the mean over the run."""

    class Client:
        socket_bytes = SocketBytes()

    async def scenario() -> float:
        client = Client()
        peak = PeakRate(client, window_s=0.05)
        sampling = asyncio.create_task(peak.run())
        for burst in (1000, 0, 0, 50_000, 0):
            client.socket_bytes.sent += burst
            await asyncio.sleep(0.05)
        sampling.cancel()
        return peak.peak

    peak = asyncio.run(scenario())
    assert 50_000 / 0.05 * 0.4 <= peak <= 50_000 / 0.05  # the burst over its window (late loops stretch it)
