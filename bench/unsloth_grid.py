"""Issue 25: Unsloth's best under a memory cap, from a small grid of its own knobs, for the `l4-vs-peers` suite
(bench/suites.py): micro-batch 1, 2 or 4 (x 16, 8 or 4 accumulation: 16 sequences a step, as fitrun's jobs),
`use_gradient_checkpointing` True or "unsloth" (its offloaded checkpointing), a 16-bit or a 4-bit base. One arm
per process, which prints one `RESULT {json}` line (bench/harness.py's script arms):

    PYTHONPATH=.:bench python bench/unsloth_grid.py --only local-model            # the random 8B, saved once
    PYTHONPATH=.:bench python bench/unsloth_grid.py --only 16bit-mb2-unsloth --cap-gib 21.99 [--steps 4]

`--uns-path DIR` puts an Unsloth install (and its pinned dependencies) first on the path for the arm.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

# Largest micro-batch first: the likeliest best runs first when a command is cut short.
GRID = [f"{bits}-mb{mb}-{gc}" for bits in ("16bit", "4bit") for mb in (4, 2, 1) for gc in ("unsloth", "gc")]
ARM = re.compile(r"(16bit|4bit)-mb([124])-(unsloth|gc)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", required=True, help=f"local-model, or one of {', '.join(GRID)}")
    ap.add_argument("--cap-gib", type=float, help="the allocator cap (the card's budget)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--uns-path", default="")
    args = ap.parse_args()
    if args.uns_path:
        sys.path.insert(0, args.uns_path)
    import quant

    if args.only == "local-model":
        quant.write_local_model()
        print("RESULT {}", flush=True)
        return
    m = ARM.fullmatch(args.only)
    if not m or args.cap_gib is None:
        ap.error(f"--only must be local-model or one of {', '.join(GRID)}, with --cap-gib")
    bits, mb, gc = m.groups()
    result = quant.unsloth_arm(args.cap_gib, four_bit=bits == "4bit", micro_batch=int(mb),
                               checkpointing="unsloth" if gc == "unsloth" else True, steps=args.steps)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
