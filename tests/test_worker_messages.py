"""What a worker tells its operator when no job can be read: the likely cause, once."""

from __future__ import annotations

from fedjet.broker.server import EmbeddedNatsServer
from fedjet.keystore import generate
from tests.conftest import run_fedjet


def test_a_worker_with_no_jetstream_to_ask_names_the_missing_js_domain(tmp_path):
    """A server without JetStream (as a leaf node looks when --js-domain is missing): the error
    says what to pass, and no stats warning is logged for a job that was never found."""
    generate(tmp_path / "keys", ["aws"])
    with EmbeddedNatsServer(tmp_path / "js", jetstream=False) as server:
        result = run_fedjet(
            "worker", "--nats", server.url, "--job", "nojob", "--cloud", "aws", "--keys", str(tmp_path / "keys"),
            "--wait-spec", "5", timeout=120,
        )  # fmt: skip
    assert result.returncode != 0
    assert "--js-domain" in result.stderr and "No JetStream answered" in result.stderr, result.stderr[-2000:]
    assert "stats_not_reported" not in result.stdout + result.stderr
