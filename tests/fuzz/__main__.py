"""Long mode: ``python -m tests.fuzz --inputs 100000 [--target NAME ...] [--seed N]``.

A plain seeded mutation loop (no hypothesis, no shrinking) over every target; prints, per
target, the inputs run, how many were accepted, the securethread.Error classes seen and the
number of non-Error exceptions, which must be 0.  Inputs that raised one are written to
``--save`` (default ``$TMPDIR/securethread-fuzz-failures``), so they can be replayed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

from tests.fuzz.mutate import RandomSource, mutate
from tests.fuzz.targets import Target, make_targets, run_one
from tests.fuzz.world import build

#: Failing inputs kept (and summarised) per target; all of them are counted.
_KEEP = 25
#: A mutation that failed (a fuzzer bug, reported apart from the parsers' outcomes).
_MUTATOR = "mutator-error"


def _fuzz(target: Target, n: int, seed: int, corpus: list[bytes], ring: object, save: Path,
          progress: bool) -> tuple[collections.Counter[str], list[str], float]:  # fmt: skip
    src = RandomSource(seed ^ zlib.crc32(target.name.encode()))
    seen: collections.Counter[str] = collections.Counter()
    bugs: list[str] = []
    sites: collections.Counter[str] = collections.Counter()
    t0 = last = time.monotonic()
    for i in range(n):
        try:
            data = mutate(src, target.seeds, corpus, ring, text=target.text)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - a fuzzer bug must not end a long run
            seen[_MUTATOR] += 1
            print(f"  {target.name}: mutator {type(exc).__name__}: {exc}"[:200], file=sys.stderr)
            continue
        outcome = run_one(target, data)
        seen[outcome.kind] += 1
        if outcome.error is not None:
            frame = traceback.extract_tb(outcome.error.__traceback__)[-1]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            sites[f"{type(outcome.error).__name__} at {where}"] += 1
        if outcome.error is not None and len(bugs) < _KEEP:
            bug = outcome.error
            save.mkdir(parents=True, exist_ok=True)
            path = save / f"{target.name}-{seed}-{i}.bin"
            path.write_bytes(data)
            tb = "".join(traceback.format_exception(bug)[-3:]).strip().replace("\n", " | ")
            bugs.append(f"{type(bug).__name__}: {str(bug)[:120]} ({path}) {tb[-300:]}")
        now = time.monotonic()
        if progress and now - last > 30:
            last = now
            rate = (i + 1) / (now - t0)
            print(f"  {target.name}: {i + 1}/{n} ({rate:.0f}/s)", file=sys.stderr, flush=True)
    summary = [f"{n} x {site}" for site, n in sites.most_common()]
    return seen, summary + bugs[:5], time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("--inputs", type=int, default=10_000, help="inputs per target")
    ap.add_argument("--target", action="append", help="run only this target (repeatable)")
    ap.add_argument("--seed", type=int, default=1, help="mutation seed (reproducible runs)")
    ap.add_argument(
        "--save", type=Path, default=Path(tempfile.gettempdir()) / "securethread-fuzz-failures",
        help="where inputs that raised a non-Error exception are written",
    )
    ap.add_argument("--list", action="store_true", help="list the targets and exit")
    ap.add_argument("--replay", type=Path, help="run --target on this one input, show the outcome")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    world = build()
    targets = make_targets(world)
    if args.list:
        print("\n".join(targets))
        return 0
    names = args.target or list(targets)
    unknown = [n for n in names if n not in targets]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; --list shows them")
    if args.replay is not None:
        if not args.target or len(args.target) != 1:
            ap.error("--replay needs exactly one --target")
        outcome = run_one(targets[args.target[0]], args.replay.read_bytes())
        if outcome.error is not None:
            traceback.print_exception(outcome.error)
        print(f"{args.target[0]}: {outcome.kind}")
        return 1 if outcome.error is not None else 0
    print(f"world built in {time.monotonic() - t0:.1f}s; {args.inputs} inputs per target, "
          f"seed {args.seed}", flush=True)  # fmt: skip
    print(f"{'target':20} {'inputs':>8} {'accepted':>8} {'non-Error':>9} {'s':>7}  "
          "securethread.Error classes (count)", flush=True)  # fmt: skip
    total_bugs = 0
    corpus = world.corpus
    for name in names:
        target = targets[name]
        seen, bugs, elapsed = _fuzz(
            target, args.inputs, args.seed, corpus, world.ring, args.save, not args.quiet
        )
        errors = ", ".join(
            f"{k} {v}" for k, v in seen.most_common() if k not in ("accepted", "bug", _MUTATOR)
        )
        print(f"{name:20} {args.inputs:>8} {seen['accepted']:>8} {seen['bug']:>9} "
              f"{elapsed:>7.0f}  {errors}", flush=True)  # fmt: skip
        for line in bugs:  # where they were raised (all), then the first inputs
            print(f"    NON-ERROR {line}", flush=True)
        if seen[_MUTATOR]:
            print(f"    ({seen[_MUTATOR]} inputs lost to mutator errors)", flush=True)
        total_bugs += seen["bug"]
    print(f"non-Error exceptions in total: {total_bugs}", flush=True)
    return 1 if total_bugs else 0


if __name__ == "__main__":
    sys.exit(main())
