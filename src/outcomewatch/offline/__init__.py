"""Offline evaluation: rule unit tests (``outcomewatch test``) and replay of stored spans
(``outcomewatch replay``). Both drive the real streaming engine with a manual clock; nothing here
writes to a database. The command line imports this package, and the server for the backtest
it answers at ``POST /api/v1/replay``.

- ``drive``: the clock and tick loop around an Engine, the verdicts it hands back, and the
  incidents they would open (the server's own lifecycle, incidents/lifecycle.py);
- ``spans``: test-file span trees and OTLP/JSON files as OTLP protobuf requests;
- ``ruletest``: test files, cases, comparison and diffs;
- ``candidates`` and ``replay``: the SQL that selects candidate spans, and the replay itself.
"""

from outcomewatch.offline.replay import ReplayReport, render_replay, replay
from outcomewatch.offline.ruletest import run_test_files

__all__ = ["ReplayReport", "render_replay", "replay", "run_test_files"]
