"""Outcome rules: YAML files -> compiled, immutable rules the analyzer evaluates against spans.

``load_rules`` raises ``RuleError`` listing every problem of every file; ``check_paths`` returns
the same problems instead, and ``check_rules`` both the rules that compiled and the problems.
See ``match`` for what a selector and its conditions mean, ``schedule`` for cron slots and
``schema.json_schema`` for the JSON Schema of a rule file.
"""

from outcomewatch.rules.load import check_paths, check_rules, load_rules, rule_files
from outcomewatch.rules.match import Bounds, Condition, DurationBounds, Rule, RuleSet, Selector
from outcomewatch.rules.schedule import Schedule
from outcomewatch.rules.schema import json_schema

__all__ = [
    "Bounds",
    "Condition",
    "DurationBounds",
    "Rule",
    "RuleSet",
    "Schedule",
    "Selector",
    "check_paths",
    "check_rules",
    "json_schema",
    "load_rules",
    "rule_files",
]
