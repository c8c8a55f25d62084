"""The job's channels over JetStream, each with both of its ends in one place.

* :mod:`.globals` - global versions: the coordinator's publisher and everyone's follower
  (workers, the observer, replay, a resuming coordinator), with one head-chain walk.
* :mod:`.updates` - updates: the worker's sender and the coordinator's inbox.
* :mod:`.kv` - the job's KV bucket: the signed spec and per-cloud stats.

Besides :mod:`fedjet.broker`, this is the only package that imports ``nats``.
"""
