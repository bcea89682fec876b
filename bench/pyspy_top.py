"""Top functions of a py-spy profile in raw (collapsed stack) format, by self and total time.

    .venv/bin/python bench/pyspy_top.py PROFILE.txt [--top 20]

Input: ``py-spy record --format raw [--threads]`` output, one ``frame;frame;... count`` line per
distinct stack, outermost frame first. A function is ``name (file)``, line numbers dropped, so
its lines add up. Self time: samples where it is the innermost Python frame (time spent in a C
extension it called, such as a DuckDB statement or a protobuf parse, counts as its self time,
since py-spy without --native sees no deeper). Total time: samples where it is anywhere on the
stack, counted once per sample. With --threads, samples per thread are listed first.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def function(frame: str) -> str:
    """``name (file:line)`` -> ``name (file)``."""
    return _LINE.sub(")", frame)


def summarise(text: str) -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    """(samples, per thread, self, total) sample counts of a raw profile."""
    threads: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[0].startswith("thread ("):
            threads[frames[0].split(": ", 1)[-1]] += count
            frames = frames[1:]
        if not frames:
            continue
        samples += count
        self_time[function(frames[-1])] += count
        for name in {function(f) for f in frames}:
            total[name] += count
    return samples, threads, self_time, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--package", default="outcomewatch/",
                        help="the total-time list shows only functions of files under this "
                             "(the thread, asyncio and executor frames above them say nothing)")
    parser.add_argument("--thread", help="only the samples of this thread name")
    args = parser.parse_args()
    text = args.profile.read_text()
    if args.thread:
        text = "\n".join(line for line in text.splitlines()
                         if line.startswith("thread (") and f": {args.thread};" in line)
    samples, threads, self_time, total = summarise(text)
    total = Counter({name: n for name, n in total.items() if args.package in name})
    if not samples:
        raise SystemExit(f"{args.profile}: no samples")
    print(f"{args.profile}: {samples:,} samples (non-idle)"
          + (f", thread {args.thread}" if args.thread else ""))
    for title, counter in [("thread", threads), ("self", self_time),
                           (f"total, {args.package} only", total)]:
        print(f"-- by {title}")
        for name, count in counter.most_common(args.top):
            print(f"{100 * count / samples:6.1f}%  {name}")


if __name__ == "__main__":
    main()
