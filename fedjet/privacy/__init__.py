"""Differential privacy: the ``--dp`` configs (pure), accounting with dp_accounting, and DP-SGD.

Import submodules directly; this package does not import torch, so config and accounting stay
usable where torch is not wanted (the coordinator).
"""
