"""Routed-attention variants on one GPU, timed side by side on the same inputs (issue 18).

At B1 T32768 H8, 10% routed, D64 and D128, bf16: first the two knobs shared by every width (how
finely key ranges split, `_SPLIT_WAVES`; query blocks last first, `_REVERSE_M`), chosen by the
sum of fwd+bwd over both widths; then the forward's tiles per width, by the forward (with grad,
as `gpu.py` times it). A variant replaces the default only when at least `MARGIN` faster. Medians
of `triton.testing.do_bench` (ms). Writes `routed_sweep.json` (every timing) and
`routed_tune.json` (the choice, in the form `ORYX_ROUTED_TUNE` reads) to `--out` (default `$OUT`).

Usage: python benchmarks/routed_sweep.py [--out DIR]
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import bench, routed_positions  # noqa: E402

from oryx_ts.kernels.attention import routed_triton as rt  # noqa: E402

DT = torch.bfloat16
MARGIN = 0.02
FWD_TILES = {128: [(64, 64, 4, 4), (64, 32, 4, 3), (128, 64, 8, 4)], 64: [(128, 64, 4, 4)]}


def inputs(B, T, H, D, frac):
    torch.manual_seed(0)
    q_pos = routed_positions(T, frac, seed=T + D)
    q = F.normalize(torch.randn(B, q_pos.numel(), H, D, device="cuda"), dim=-1).to(DT).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, D, device="cuda"), dim=-1).to(DT).requires_grad_()
    v = torch.randn(B, T, H, D, device="cuda", dtype=DT).requires_grad_()
    kw = dict(q_pos_Tq=q_pos, k_pos_S=torch.arange(T, device="cuda"), scale_H=torch.full((H,), 1 / math.sqrt(D), device="cuda"))
    return q, k, v, kw, torch.randn(B, q_pos.numel(), H, D, device="cuda", dtype=DT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cases = {D: inputs(1, 32768, 8, D, 0.1) for D in (64, 128)}
    refs = {}
    with torch.no_grad():
        for D, (q, k, v, kw, _) in cases.items():
            refs[D] = rt.routed_attention_triton(q, k, v, **kw).float()

    def time_case(D, label):
        q, k, v, kw, do = cases[D]
        f = lambda: rt.routed_attention_triton(q, k, v, **kw)  # noqa: E731
        o = f()
        err = float((o.detach().float() - refs[D]).norm() / refs[D].norm())
        r = dict(D=D, variant=label, fwd=bench(f), fb=bench(lambda: f().backward(do)), err=err,
                 waves=rt._SPLIT_WAVES, reverse_m=rt._REVERSE_M, fwd_tile=rt.TILES[("fwd", "16bit", D)])
        rows.append(r)
        print(r, flush=True)
        (out / "routed_sweep.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
        return r

    default = dict(waves=rt._SPLIT_WAVES, rev=rt._REVERSE_M)
    knobs = [default, dict(waves=default["waves"], rev=not default["rev"]), dict(waves=4, rev=default["rev"]),
             dict(waves=16, rev=default["rev"])]
    totals = []
    for kn in knobs:
        rt._SPLIT_WAVES, rt._REVERSE_M = kn["waves"], kn["rev"]
        totals.append(sum(time_case(D, f"waves={kn['waves']} reverse_m={kn['rev']}")["fb"] for D in cases))
    best = min(range(len(knobs)), key=totals.__getitem__)
    best = best if totals[best] < (1 - MARGIN) * totals[0] else 0
    rt._SPLIT_WAVES, rt._REVERSE_M = knobs[best]["waves"], knobs[best]["rev"]
    tune = dict(split_waves=rt._SPLIT_WAVES, reverse_m=rt._REVERSE_M, tiles={})
    for D, tiles in FWD_TILES.items():
        key = ("fwd", "16bit", D)
        base = rt.TILES[key]
        base_ms = min(r["fwd"] for r in rows if r["D"] == D and r["waves"] == rt._SPLIT_WAVES and r["reverse_m"] == rt._REVERSE_M)
        choice, choice_ms = base, base_ms
        for tile in tiles:
            rt.TILES[key] = tile
            try:
                ms = time_case(D, f"fwd tile {tile}")["fwd"]
            except Exception as e:  # e.g. out of shared memory
                rows.append(dict(D=D, variant=f"fwd tile {tile}", error=f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            if ms < (1 - MARGIN) * choice_ms:
                choice, choice_ms = tile, ms
        rt.TILES[key] = choice
        if choice != base:
            tune["tiles"][f"fwd,16bit,{D}"] = list(choice)
    (out / "routed_tune.json").write_text(json.dumps(tune))
    print("chosen:", json.dumps(tune), flush=True)


if __name__ == "__main__":
    main()
