"""Write the bundled sample: a deterministic subset of the shared datasets, frames copied verbatim.

Run from the repository root: ``python -m sample_data.make_sample [--src /work/shared/data]``. Frames are
cut out of the source files as text (no parse and rewrite), so the sample holds exactly the source numbers;
gzip headers carry no time or name, so reruns are byte-identical.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

from data_prep.readers.extxyz import frames

SEED = 20260415
# file: "all", a number of frames, or "smallest-N" for the N frames with the fewest atoms. Every crystal
# and molecule: a potential learns crystals' forces from hundreds of frames per element family, and 240
# crystals over 69 elements taught the default run none (benchmarks/results/learning_*.md).
PLAN = {
    "crystals_pbe.extxyz.gz": "all",
    "crystals_r2scan.extxyz.gz": "all",
    "molecules_gfn2.extxyz.gz": "all",
    "alloys_emt.extxyz.gz": "smallest-4",  # 4, so the held-out split gets one (the 980-atom cell)
}


def select(blocks: list[list[str]], rule: int | str, seed: int) -> list[int]:
    if rule == "all":
        return list(range(len(blocks)))
    if isinstance(rule, str):
        count = int(rule.removeprefix("smallest-"))
        return sorted(sorted(range(len(blocks)), key=lambda k: (len(blocks[k]), k))[:count])
    return sorted(np.random.default_rng(seed).choice(len(blocks), size=rule, replace=False).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    for k, (name, rule) in enumerate(PLAN.items()):
        blocks = [b for _, b in frames(args.src / name) if isinstance(b, list)]
        chosen = select(blocks, rule, SEED + k)
        with open(args.out / name, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as fh:
            fh.write(b"".join(line for i in chosen for line in blocks[i]))
        listed = "all" if len(chosen) == len(blocks) else chosen
        print(f"{name}: {len(chosen)} of {len(blocks)} frames: {listed}")


if __name__ == "__main__":
    main()
