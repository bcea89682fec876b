"""Offline evaluation: rule unit tests (``outcomewatch test``) and replay of stored spans
(``outcomewatch replay``). Both drive the real streaming engine with a manual clock; nothing here
writes to a database. Only the command line imports this package.

- ``drive``: the clock and tick loop around an Engine, and the verdicts it hands back;
- ``incidents``: the incidents those verdicts would open (flap control as the store does it);
- ``spans``: test-file span trees and OTLP/JSON files as OTLP protobuf requests;
- ``ruletest``: test files, cases, comparison and diffs;
- ``candidates`` and ``replay``: the SQL that selects candidate spans, and the replay itself.
"""

from outcomewatch.offline.replay import ReplayReport, render_replay, replay
from outcomewatch.offline.ruletest import run_test_files

__all__ = ["ReplayReport", "render_replay", "replay", "run_test_files"]
