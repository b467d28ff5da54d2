"""Datasets, cards and provenance from a run's records."""

from rlaif.export.sl_cai import export_sl_cai, sl_cai_rows

__all__ = ["export_sl_cai", "sl_cai_rows"]
