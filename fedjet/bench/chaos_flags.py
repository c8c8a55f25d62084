"""The flags of ``fedjet bench chaos``, apart from the benchmark so the CLI builds its parser
without importing torch."""

from __future__ import annotations

import argparse


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="fedjet bench chaos", description="a job under SIGKILLs and nats restarts, audited"
    )
    p.add_argument("--kills", type=int, default=20, help="SIGKILL the coordinator this many times")
    p.add_argument("--nats-restarts", type=int, default=3, help="stop and start the nats-server this many times")
    p.add_argument("--worker-kills", type=int, default=3, help="SIGKILL a random worker this many times")
    p.add_argument("--rank-kills", type=int, default=0, help="SIGKILL an extra rank of a random worker this many times")
    p.add_argument("--worker-flags", default="", help="more worker flags, e.g. '--nproc-per-node 2'")
    p.add_argument("--rounds", type=int, default=None, help="global versions (default: 2 x the largest count + 6)")
    p.add_argument("--seed", type=int, default=0, help="the job's seed and the chaos schedule's")
    p.add_argument("--data", default=None, help="WikiText directory (else $FEDJET_DATA, ./data/wikitext-2)")
    p.add_argument("--out", default=None, help="keep store, keys and logs in DIR (default: removed)")
    p.add_argument("--job", default="chaos")
    p.add_argument("--strategy", default="fedavg", choices=["fedavg", "dynamic", "gradient", "async", "fedbuff"])
    p.add_argument("--clouds", default="aws,gcp,azure")
    p.add_argument("--local-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--codec", default="topk:0.01+int8")
    p.add_argument("--job-flags", default="", help="more coordinator job flags, e.g. '--round-deadline 5 --quorum 2'")
    p.add_argument("--max-down", type=float, default=2.0, help="longest nats outage / worker absence (s)")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    p.add_argument("--inline-replay", action="store_true", help="verify in this process, not with fedjet replay")
    return p
