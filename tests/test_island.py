"""Island mode on real servers: a hub and three island-capable leaves from ``fedjet deploy nats``,
aws's leaf reaching the hub through a relay the test cuts for longer than the streams' duplicate
window (shrunk to 3 s) in the middle of a FedBuff job (its default, --island queue: every phase's
update waits on the leaf), its leaf server restarted during the
cut. The other clouds keep making versions; aws's worker keeps training and does not exit; when
the link returns its queued updates reach the coordinator, each once (counted from the worker's
own acknowledged sends, from its leaf's stream and from the hub's, not only from the records);
the job replays bit for bit; and aws's updates made the model better on held-out text of aws's
own kind (aws trains on WikiText in capitals, the others on WikiText as it is) than the same run
re-aggregated without them."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from fedjet.bench.chaos_audit import account, acknowledged_sends, read_records, read_sent
from fedjet.broker.jetstream import DUPLICATE_WINDOW_ENV
from fedjet.channel.globals import GlobalFollower
from fedjet.channel.recorded import coordinator_view
from fedjet.codecs.frame import Limits
from fedjet.coordinator.admission import Admission
from fedjet.deploy import TopologyConfig
from fedjet.keystore import generate as generate_keys
from tests.conftest import FedjetProcess, run_fedjet
from tests.link_cut import CuttableLink
from tests.topology_helpers import CLOUDS, JOB, SUBJECTS, _free_base_port, _wait_leaves, running, session

pytestmark = pytest.mark.e2e

ISLAND = "aws"
CUT_S = 10.0  # longer than the duplicate window below, with a leaf restart inside
TRAIN = ["--local-steps", "3", "--batch-size", "4", "--seq-len", "64"]


def identity(topology, name: str) -> list[str]:
    return ["--nkey", str(topology.identities[name].nkey), "--tls-ca", str(topology.ca), "--js-domain", "hub"]


def route_leaf_through(topology, cloud: str, link: CuttableLink, hub_leaf_port: int) -> None:
    """Point ``cloud``'s leaf at the relay instead of the hub's leafnode port."""
    conf = next(s.config for s in topology.servers if s.cloud == cloud)
    text = conf.read_text()
    assert f"127.0.0.1:{hub_leaf_port}" in text
    conf.write_text(text.replace(f"127.0.0.1:{hub_leaf_port}", f"127.0.0.1:{link.port}"))


def shown(status: list[str]) -> dict:
    done = run_fedjet(*status, "--json", timeout=60)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def versions(status: list[str]) -> int:
    return int((shown(status).get("head") or {}).get("version", -1))


def island_link(status: list[str]) -> dict:
    """What ``fedjet status`` says of the island's link (the hub's view of its leaf)."""
    return (shown(status).get("clouds", {}).get(ISLAND) or {}).get("link") or {}


def island_data(data_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The island's own text, unlike the others' (WikiText in capitals: other bytes to learn),
    and held-out text of the same kind it never trains on (from the test split)."""
    own = tmp_path / "aws-data"
    own.mkdir()
    (own / "wiki.valid.tokens").write_text((data_dir / "wiki.valid.tokens").read_text()[:400_000].upper())
    heldout = tmp_path / "aws-heldout.txt"
    heldout.write_text((data_dir / "wiki.test.tokens").read_text()[:60_000].upper())
    return own, heldout


def island_sends_logged(log: Path) -> set[int]:
    """Sequence numbers of the updates the worker sent while cut off (acknowledged by its leaf)."""
    events = [json.loads(line) for line in log.read_text(errors="replace").splitlines() if '"update_sent"' in line]
    return {int(e["seq"]) for e in events if e.get("island")}


def _wait_until_applied(seqs: set[int], coordinator_log: Path, coordinator: FedjetProcess) -> None:
    """Until the coordinator has applied every one of the island's queued updates (at most 90 s)."""
    assert seqs, "the island sent nothing while cut off"
    deadline = time.monotonic() + 90
    while True:
        lines = coordinator_log.read_text(errors="replace").splitlines()
        applied = {int(json.loads(line)["seq"]) for line in lines if '"update_applied"' in line and ISLAND in line}
        if seqs <= applied:
            return
        assert coordinator.poll() is None and time.monotonic() < deadline, f"not applied: {sorted(seqs - applied)}"
        time.sleep(0.5)


def island_phases(log: Path) -> int:
    return log.read_text(errors="replace").count('"island_phase"')


def test_an_island_trains_through_a_cut_and_its_queued_updates_arrive_once(tmp_path, data_dir):
    keys = tmp_path / "keys"
    generate_keys(keys, [*CLOUDS, "eval"])
    config = TopologyConfig(
        clouds=CLOUDS, job=JOB, out=tmp_path / "deploy", hub_size=1, base_port=_free_base_port(3 + len(CLOUDS))
    )
    hub_leaf_port = config.hub_ports(0)[2]
    link = CuttableLink(hub_leaf_port)
    env = {DUPLICATE_WINDOW_ENV: "3"}
    logs = tmp_path / "logs"
    logs.mkdir()
    with running(config, tmp_path, edit=lambda t: route_leaf_through(t, ISLAND, link, hub_leaf_port)) as cluster:
        topology = cluster.topology
        asyncio.run(_wait_leaves(topology))
        hub = ",".join(topology.hub)
        coordinator = FedjetProcess(
            "coordinator", "--nats", hub, *identity(topology, "coordinator"), "--keys", str(keys), "--job", JOB,
            "--clouds", ",".join(CLOUDS), "--strategy", "fedbuff", "--max-updates", "1000", "--max-staleness", "200",
            *TRAIN, env=env, log=logs / "coordinator.log",
        )  # fmt: skip
        own_text, island_heldout = island_data(data_dir, tmp_path)
        workers = {
            cloud: FedjetProcess(
                "worker",
                "--nats",
                topology.leaf[cloud],
                *identity(topology, cloud),
                "--keys",
                str(keys),
                "--job",
                JOB,
                "--cloud",
                cloud,
                *(["--data", str(own_text)] if cloud == ISLAND else ["--deal", "--data", str(data_dir)]),
                env=env,
                log=logs / f"worker-{cloud}.log",
            )
            for cloud in CLOUDS
        }
        procs = [coordinator, *workers.values()]
        status = ["status", "--nats", hub, *identity(topology, "coordinator"), "--keys", str(keys), "--job", JOB]
        island_log = logs / f"worker-{ISLAND}.log"
        try:
            deadline = time.monotonic() + 120
            while versions(status) < 2:
                assert time.monotonic() < deadline and coordinator.poll() is None, (
                    logs / "coordinator.log"
                ).read_text()
                time.sleep(1)
            link.cut()
            cut_at, before = time.monotonic(), versions(status)
            time.sleep(CUT_S / 2)
            stored_before_restart = island_sends_logged(island_log)
            cluster.stop(f"leaf-{ISLAND}")  # the island's own server goes down and comes back mid-cut
            cluster.start(f"leaf-{ISLAND}")
            time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
            during = versions(status)
            cut_off = island_link(status)
            phases = island_phases(island_log)
            assert workers[ISLAND].poll() is None, island_log.read_text()[-3000:]
            link.restore()
            _wait_until_applied(island_sends_logged(island_log), logs / "coordinator.log", coordinator)
            linked = island_link(status)
            for name, proc in [("coordinator", coordinator), *workers.items()]:  # the job would go on
                proc.terminate()
                proc.wait(timeout=60)
                log = logs / ("coordinator.log" if name == "coordinator" else f"worker-{name}.log")
                assert proc.returncode == 0, log.read_text()[-3000:]
        finally:
            link.close()
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert during >= before + 3, "the other clouds kept making versions during the cut"
        assert phases >= 2, "the island kept training while cut off"
        assert cut_off["link"] == "island" and cut_off["since_contact_s"] >= 5, cut_off
        assert linked["link"] == "up", linked
        result, island_sends = asyncio.run(_audit(topology, keys, logs))
        assert result["lost"] == result["doubled"] == 0, result
        assert result["acknowledged_missing"] == result["unauthenticated"] == result["partial_blobs"] == 0, result
        acknowledged = {s for s in acknowledged_sends(logs) if s[0] == ISLAND}
        assert island_sends == acknowledged, "the island's leaf stream holds exactly what its worker saw acknowledged"
        assert stored_before_restart, "the island queued an update before its leaf restarted"
        assert {(ISLAND, "0", seq) for seq in stored_before_restart} <= island_sends, "the restart lost what it stored"
        verify = run_fedjet(
            "replay", "--nats", hub, *identity(topology, "coordinator"), "--keys", str(keys), "--job", JOB,
            "--verify", "--no-progress", timeout=120,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert json.loads(verify.stdout.strip().splitlines()[-1])["mismatches"] == 0
        with_island = _counterfactual_loss(hub, topology, keys, island_heldout, tmp_path / "with.json", ())
        without = _counterfactual_loss(hub, topology, keys, island_heldout, tmp_path / "without.json", (ISLAND,))
    print(json.dumps({  # the measured run the README quotes (pytest -s)
        "cut_s": CUT_S, "island_phases": phases, "queued": len(island_sends_logged(island_log)),
        "applied_from_island": len(island_sends_logged(island_log)), "loss_with_island": round(with_island, 4),
        "loss_without": round(without, 4), "versions_during_cut": during - before,
    }))  # fmt: skip
    assert with_island < without, (with_island, without)


async def _audit(topology, keys: Path, logs: Path) -> tuple[dict, set]:
    """The records and the hub's updates stream, as the chaos audit reads them, and the updates
    in the island's own leaf stream: each must be in the hub's stream exactly once."""
    async with session(topology, "coordinator") as co:
        js = co.nc.jetstream(timeout=10.0)
        spec, boxes = await coordinator_view(js, SUBJECTS, str(keys))
        admission = Admission(spec, boxes, Limits())
        recorded = await read_records(js, SUBJECTS, GlobalFollower(js, SUBJECTS, boxes, Limits()))
        sent = await read_sent(js, SUBJECTS, admission)
    async with session(topology, ISLAND) as aws:
        local = aws.nc.jetstream(timeout=10.0)  # the leaf's own JetStream
        on_leaf = await read_sent(
            local, SUBJECTS, admission, stream=SUBJECTS.island_stream(ISLAND), subject=SUBJECTS.island_update(ISLAND)
        )
    copies = Counter(sent.by_seq.values())
    assert max(copies.values()) == 1, "an update reached the hub's stream twice"
    island_sends = set(on_leaf.by_seq.values())
    assert island_sends <= set(copies), "an update waiting on the leaf never reached the hub"
    return account(recorded, sent, acknowledged_sends(logs)), island_sends


def _counterfactual_loss(
    hub: str, topology, keys: Path, heldout: Path, report: Path, without: tuple[str, ...]
) -> float:
    """Final held-out loss of the recorded updates re-aggregated (FedBuff, as recorded), with or
    without the island's, on held-out text of the island's own kind."""
    args = ["--without", ",".join(without)] if without else []
    done = run_fedjet(
        "replay", "--nats", hub, *identity(topology, "coordinator"), "--keys", str(keys), "--job", JOB,
        "--strategy", "fedbuff", "--max-staleness", "200", "--eval-data", str(heldout),
        "--eval-tokens", "4096", "--report", str(report), "--no-progress", *args, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return float(json.loads(report.read_text())["summary"]["final_eval_loss"])
