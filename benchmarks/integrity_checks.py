"""What the integrity checks cost: the weights checksum a draft records and every load
verifies, and the target fingerprint eval.py and the exports compare, next to a plain
``load_draft`` of the same draft (default SmolLM2 configs, the embedded target).

    python benchmarks/integrity_checks.py [--algos dspark,eagle3] [--repeats 5]

Prints one line per draft: weights size, save time, checksum time (best of ``--repeats``)
and throughput, ``load_draft`` time (which includes the checksum), and the memoised target
fingerprint.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

from deepspec.config import load_config
from deepspec.data.fingerprint import target_fingerprint
from deepspec.drafts import build_draft, load_draft
from deepspec.drafts.saving import WEIGHTS_NAME, weights_checksum
from deepspec.targets import resolve_target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", default="dspark,eagle3")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    target = resolve_target("embedded:smollm2-135m-instruct")
    target_fingerprint(target)  # memoised from here on, as in every later run
    with tempfile.TemporaryDirectory() as tmp:
        for algo in args.algos.split(","):
            cfg = load_config(f"{ROOT}/config/{algo}/{algo}_smollm2_135m.py", [])
            draft = os.path.join(tmp, algo)
            save = best_of(1, lambda: build_draft(cfg, target).save_pretrained(draft))  # noqa: B023
            size = os.path.getsize(os.path.join(draft, WEIGHTS_NAME))
            checksum = best_of(args.repeats, lambda: weights_checksum(draft))  # noqa: B023
            load = best_of(args.repeats, lambda: load_draft(draft))  # noqa: B023
            fingerprint = best_of(args.repeats, lambda: target_fingerprint(target))
            print(
                f"{algo}: weights {size / 2**20:.1f} MiB; build + save_pretrained {save:.2f} s; checksum "
                f"{checksum * 1e3:.1f} ms ({size / checksum / 2**30:.2f} GiB/s); load_draft {load * 1e3:.0f} ms "
                f"({100 * checksum / load:.0f}% of it the checksum); target fingerprint (memoised) "
                f"{fingerprint * 1e3:.2f} ms"
            )


if __name__ == "__main__":
    main()
