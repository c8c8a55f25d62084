"""Shared fixtures: a real nats-server per test, the shared WikiText copy, tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedjet.broker.server import EmbeddedNatsServer

REPO = Path(__file__).resolve().parents[1]


def _find_data() -> Path:
    env = os.environ.get("FEDJET_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "wikitext-2")
    for path in candidates:
        if (path / "wiki.valid.tokens").is_file():
            return path
    raise RuntimeError(
        "tests need WikiText-2 (wiki.valid.tokens, wiki.test.tokens): set FEDJET_DATA=DIR "
        "or place it at ../shared/data/wikitext-2 next to the repository"
    )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _find_data()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    """A fresh JetStream server on a random loopback port; stopped after the test."""
    server = EmbeddedNatsServer(tmp_path / "js")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNatsServer) -> str:
    return nats_server.url


def run_fedjet(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "fedjet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def processes_matching(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (to prove nothing was left)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found
