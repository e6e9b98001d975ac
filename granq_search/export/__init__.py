"""Best trial -> production config: pick a trial of a search and write its complete config."""

from granq_search.export.production import ExportPlan, export_config, plan_export, write_export
from granq_search.export.select import RULES, describe_rule, select_trial

__all__ = ["select_trial", "describe_rule", "RULES", "export_config", "plan_export", "write_export", "ExportPlan"]
