import collections, atexit, json
from tests import test_api_fuzz as m
from hypothesis import settings, HealthCheck
import pytest

STATS = collections.defaultdict(collections.Counter)
PHASES = collections.Counter()
@atexit.register
def dump():
    for k, v in sorted(STATS.items()):
        print(k, dict(v))
    print(dict(PHASES))

app = m.app
conn = m.conn

@m.schema.parametrize()
@settings(max_examples=40, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_probe(case, app):
    PHASES[(case.meta.phase.name.value, str(case.meta.generation.mode))] += 1
    try:
        r = case.call(app=app, headers=m.AUTH)
        STATS[f"{case.method} {case.path}"][r.status_code] += 1
        case.validate_response(r, checks=m.CHECKS, headers=m.AUTH)
    except Exception as e:
        STATS[f"{case.method} {case.path}"]["EXC "+type(e).__name__] += 1
        raise
