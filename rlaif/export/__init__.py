"""Datasets, cards and provenance from a run's records."""

from rlaif.export.card import PushToHubError, push_to_hub
from rlaif.export.filters import PreferenceExportConfig
from rlaif.export.preferences import export_preferences
from rlaif.export.sl_cai import export_sl_cai, sl_cai_rows

__all__ = [
    "PreferenceExportConfig",
    "PushToHubError",
    "export_preferences",
    "export_sl_cai",
    "push_to_hub",
    "sl_cai_rows",
]
