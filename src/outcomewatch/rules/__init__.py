"""Outcome rules: YAML files -> compiled, immutable rules the analyzer evaluates against spans.

``load_rules`` raises ``RuleError`` listing every problem of every file; ``check_paths`` returns
the same problems instead. See ``match`` for what a selector and its conditions mean.
"""

from outcomewatch.rules.load import check_paths, load_rules, rule_files
from outcomewatch.rules.match import Condition, Rule, RuleSet, Selector

__all__ = ["Condition", "Rule", "RuleSet", "Selector", "check_paths", "load_rules", "rule_files"]
