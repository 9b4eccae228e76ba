"""Run every benchmark and print its ratios against the project's targets."""

from __future__ import annotations

import sys

from benchmarks import inprocess


def main() -> int:
    rows = inprocess.run()
    print()
    print(f"{'ratio':<48} {'measured':>9} {'target':>9}")
    failed = 0
    for what, ratio, target in rows:
        ok = ratio <= target
        failed += not ok
        print(
            f"{what:<48} {ratio:>8.3f}x {'<=':>3}{target:.2f}x {'' if ok else 'MISSED'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
