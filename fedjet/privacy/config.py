"""Moved to :mod:`fedjet.config.privacy` (the config layer); kept while importers move."""

from fedjet.config.privacy import ACCOUNTANTS, CentralDPConfig, DPConfig, parse_central_dp, parse_dp

__all__ = ["ACCOUNTANTS", "CentralDPConfig", "DPConfig", "parse_central_dp", "parse_dp"]
