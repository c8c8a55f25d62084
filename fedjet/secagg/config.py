"""Moved to :mod:`fedjet.config.secure_agg` (the config layer); kept while importers move."""

from fedjet.config.secure_agg import SecureAggConfig, check_job, parse_secure_agg

__all__ = ["SecureAggConfig", "check_job", "parse_secure_agg"]
