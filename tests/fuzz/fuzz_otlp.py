"""Coverage-guided fuzzing of the OTLP decoders with atheris (libFuzzer). Not a pytest test:
tests/test_otlp_fuzz.py runs the derandomized hypothesis counterpart in CI.

Every input goes to both decoders (binary protobuf, then OTLP/JSON) and, when one accepts it,
through ``batch_from_request`` under the default and under tiny limits. Anything but a
SpanBatch or an InvalidPayload is a crash. From the repository root:

    .venv/bin/pip install atheris
    mkdir -p /tmp/otlp-fuzz
    .venv/bin/python tests/fuzz/fuzz_otlp.py /tmp/otlp-fuzz tests/corpus/otlp -max_total_time=300

libFuzzer writes the inputs it finds interesting into the first directory, so give it a scratch
one and keep tests/corpus/otlp (read as seeds) clean; copy a crashing input (crash-<sha1>, written
to the working directory) into tests/corpus/otlp/ under a name that says what it must decode to
(see tests/fuzz/make_otlp_corpus.py). Add ``-jobs=N -workers=N`` to fuzz on N cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

with atheris.instrument_imports():
    from outcomewatch.errors import InvalidPayload
    from outcomewatch.otlp import batch_from_request, parse_protobuf
    from outcomewatch.otlp_limits import SpanLimits
    from outcomewatch.receiver.otlp_json import parse_json

TINY = SpanLimits(max_attributes_per_span=2, max_attribute_value_bytes=8, max_value_depth=1,
                  max_events_per_span=1, max_links_per_span=1)


def test_one_input(data: bytes) -> None:
    for decode in (parse_protobuf, parse_json):
        try:
            request = decode(data)
        except InvalidPayload:
            continue
        total = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        for limits in (SpanLimits(), TINY):
            batch = batch_from_request(request, received_ns=0, limits=limits)
            assert len(batch) + batch.rejected == total, (len(batch), batch.rejected, total)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
