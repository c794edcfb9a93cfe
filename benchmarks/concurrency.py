"""Two anomalens processes at once on a small machine: wall time of one `video predict` alone and of
two side by side, with anomalens' OpenMP spin setting (GOMP_SPINCOUNT=10000, set on import) and with
libgomp's own default (300,000 spins before an idle thread sleeps) or OMP_WAIT_POLICY=PASSIVE.

    python benchmarks/concurrency.py --model MODEL_DIR --video FRAMES_DIR [--out rows.jsonl]

MODEL_DIR: a video model (`anomalens video fit`). Prints a table; with `--out`, appends JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tables import append_jsonl, print_markdown  # noqa: E402

SETTINGS = {
    "anomalens default (GOMP_SPINCOUNT=10000)": {},
    "libgomp default (GOMP_SPINCOUNT=300000)": {"GOMP_SPINCOUNT": "300000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def _start(model: str, video: str, out: Path, extra: dict) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(extra)
    cli = Path(sys.executable).with_name("anomalens")
    # stderr (progress bars) to a file: a pipe nobody reads while the other process runs could fill and stall it
    with open(out.with_suffix(".log"), "wb") as log:
        return subprocess.Popen([str(cli), "video", "predict", model, video, "--out", str(out), "--no-mp4"], env=env, stdout=subprocess.DEVNULL, stderr=log)


def _run(model: str, video: str, n: int, extra: dict) -> list[float]:
    """Wall seconds from the start to the end of each of ``n`` predictions started together."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        procs = [_start(model, video, Path(tmp) / str(i), extra) for i in range(n)]
        ends: list[float | None] = [None] * n
        while None in ends:  # each process's own end, whichever finishes first
            for i, p in enumerate(procs):
                if ends[i] is None and p.poll() is not None:
                    ends[i] = time.perf_counter() - t0
                    if p.returncode:
                        raise SystemExit(f"predict failed: {(Path(tmp) / f'{i}.log').read_text(errors='replace')[-500:]}")
            time.sleep(0.05)
    return [float(e) for e in ends]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--video", required=True)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for name, extra in SETTINGS.items():
        alone = _run(args.model, args.video, 1, extra)[0]
        pair = _run(args.model, args.video, 2, extra)
        row = {"date": time.strftime("%Y-%m-%d"), "setting": name, "env": extra, "alone_s": round(alone, 1), "pair_s": [round(v, 1) for v in pair], "cpus": os.cpu_count()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print_markdown(["setting", "one predict alone, s", "two side by side, s (each)"],
                   [[r["setting"], r["alone_s"], " / ".join(str(v) for v in r["pair_s"])] for r in rows])
    append_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
