"""Writes models/fixtures/features.json: the conditioning features `common.features` measures on
a few grids, and a Spearman's rho as `control_check` computes it, for the engine's port
(src/model/features.rs) to be held to. `roomscore model
control` measures the music it generates with that port, so a drift between the two would make
"asked" and "heard" different units without any test noticing.

    .venv/bin/python models/train/features_fixture.py
    .venv/bin/python models/train/features_fixture.py --check   # CI: the committed file is current

The grids: the two JSB test pieces already in the parity fixture (fixtures/jsb_test_slice.json,
read back from their tokens), and made-up ones for the edges: random pitches and rests over the
whole MIDI range, a chromatic cluster (flat or symmetric histograms: no key, or rotations that tie), silence, a lone drone, and a
grid shorter than either window.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import control_check as CC  # noqa: E402

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def jsb_grids():
    fx = json.load(open(os.path.join(MODELS, "fixtures", "jsb_test_slice.json")))
    for p in fx["pieces"]:
        tokens = np.asarray(p["tokens"][1:])  # after BOS, raster S A T B
        grid = C.tokens_to_pitch(tokens.reshape(p["steps"], 4))
        yield f"jsb test piece {p['index']}", grid


def made_up_grids():
    rng = np.random.RandomState(7)
    g = rng.randint(0, 128, size=(300, 4))
    # Rests, and held notes (a voice keeping its pitch is no onset).
    g[rng.rand(300, 4) < 0.2] = -1
    held = rng.rand(300, 4) < 0.4
    for t in range(1, 300):
        g[t, held[t]] = g[t - 1, held[t]]
    yield "random pitches, rests and holds", g
    yield "chromatic cluster", np.array([[60 + (t + v * 3) % 12 for v in range(4)] for t in range(96)])
    yield "silence", np.full((40, 4), -1)
    drone = np.full((80, 4), -1)
    drone[:, 3] = 43
    yield "a drone in the bass", drone
    yield "five steps", np.array([[72, 67, 64, 48], [72, 67, 64, 48], [74, 65, 62, 50], [-1, 65, 62, 50],
                                  [76, 67, 60, 48]])


def differences(want, got, where="features.json"):
    """Where `got` (the file) departs from `want` (measured now), beyond float rounding."""
    if isinstance(want, dict) and isinstance(got, dict):
        if want.keys() != got.keys():
            return [f"{where}: fields {sorted(got)}, measured {sorted(want)}"]
        return [d for k in want for d in differences(want[k], got[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: {len(got)} items, measured {len(want)}"]
        return [d for i, (w, g) in enumerate(zip(want, got)) for d in differences(w, g, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        ok = math.isclose(want, got, rel_tol=1e-9, abs_tol=1e-12)
    else:
        ok = want == got
    return [] if ok else [f"{where}: {got!r} in the file, {want!r} measured"]


def main():
    ap = argparse.ArgumentParser(description="Write (or check) models/fixtures/features.json.")
    ap.add_argument("--check", action="store_true",
                    help="compare the committed file with what common.features measures now; "
                         "exit 1, naming each value, where they differ")
    check = ap.parse_args().check
    cases = []
    for name, grid in [*jsb_grids(), *made_up_grids()]:
        density, register, mode, tonic = C.features(grid)
        cases.append(dict(
            name=name,
            grid=[[int(p) for p in step] for step in grid],
            density=[float(x) for x in density],
            register=[None if np.isnan(x) else float(x) for x in register],
            mode=[int(x) for x in mode],
            tonic=[int(x) for x in tonic],
        ))
    # Spearman's rho as control_check computes it, on a sweep's shape: each value asked many times.
    rng = np.random.RandomState(3)
    asked = np.repeat([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 8)
    heard = np.round(asked + rng.normal(0, 1.2, asked.shape), 1)
    out = dict(
        description="common.features on each grid (MIDI pitches, -1 silence, steps x S A T B): density "
                    "(onsets/beat), register (mean MIDI pitch, null when nothing sounds in the window), mode "
                    "(1 major, 0 minor, -1 unknown), tonic (pitch class, -1 unknown). Written by "
                    "models/train/features_fixture.py.",
        density_half=C.DENSITY_HALF, mode_half=C.MODE_HALF, cases=cases,
        spearman=dict(asked=asked.tolist(), heard=heard.tolist(), rho=CC.spearman(asked, heard)),
    )
    path = os.path.join(MODELS, "fixtures", "features.json")
    if check:
        # Through JSON, as the file was written: tuples become lists, NaN stays out.
        with open(path) as f:
            committed = json.load(f)
        diff = differences(json.loads(json.dumps(out)), committed)
        for d in diff[:20]:
            print(d, file=sys.stderr)
        if diff:
            sys.exit(f"{path}: {len(diff)} values differ from what common.features measures now; "
                     f"run models/train/features_fixture.py and commit the file")
        print(f"{path}: current ({len(cases)} grids)")
        return
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"{path}: {len(cases)} grids, {sum(len(c['grid']) for c in cases)} steps")


if __name__ == "__main__":
    main()
