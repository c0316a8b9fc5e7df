"""Prepare roomscore's training data: every corpus -> 16th-note S/A/T/B token grids + raw
conditioning features, cached under models/train/data/ (git-ignored).

    .venv/bin/python models/train/prepare.py            # full run (~10 min on 2 cores)
    .venv/bin/python models/train/prepare.py --quick    # tiny smoke run
    .venv/bin/python models/train/prepare.py --refeature  # features only, from the grids already saved

Corpora (each a style): chorale = JSB Chorales train split (valid/test are written separately for
selection and evaluation only, never trained on); quartet, palestrina, folk from music21's corpus.
music21's own Bach chorales are never read.
"""
import argparse
import collections
import json
import os
import random
import re
import sys
import time
from fractions import Fraction
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
JSB = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "jsb-chorales", "Jsb16thSeparated.json"))
OUT = os.path.join(HERE, "data")

OFFGRID_PIECE_LIMIT = 0.10  # drop a piece if more than 10 % of its notes are off the 16th grid
MAX_STEPS = 16384


def m21_corpus_dir():
    import music21

    return os.path.join(os.path.dirname(music21.__file__), "corpus")


# ---------------------------------------------------------------- music21 -> grid
def parts_to_grid(parts, stats):
    """parts: list of 4 music21 parts in S, A, T, B order -> int grid [steps, 4] (-1 silence)."""
    from music21 import chord as m21chord

    events = []  # (voice, start_step, end_step, midi, is_tie_continuation)
    total_q = 0
    for v, part in enumerate(parts):
        flat = part.flatten()
        for n in flat.notes:
            if n.duration.isGrace or n.quarterLength == 0:
                stats["grace_notes_dropped"] += 1
                continue
            off = Fraction(n.offset)
            ql = Fraction(n.quarterLength)
            s, e = off * 4, (off + ql) * 4
            if s.denominator != 1 or e.denominator != 1:
                stats["offgrid_notes"] += 1
                s2, e2 = round(s), round(e)
                if e2 <= s2:
                    stats["offgrid_notes_dropped"] += 1
                    continue
                stats["offgrid_notes_snapped"] += 1
                s, e = s2, e2
            s, e = int(s), int(e)
            if isinstance(n, m21chord.Chord):
                ps = [p.midi for p in n.pitches]
                if not ps:
                    continue
                stats["chord_notes_reduced"] += len(ps) - 1
                midi = min(ps) if v == 3 else max(ps)
            else:
                midi = n.pitch.midi
            tie_cont = n.tie is not None and n.tie.type in ("stop", "continue")
            events.append((v, s, e, midi, tie_cont))
            total_q = max(total_q, e)
    stats["notes_seen"] += len(events)
    if total_q == 0:
        return None
    if total_q > MAX_STEPS:
        stats["steps_truncated"] += total_q - MAX_STEPS
        total_q = MAX_STEPS
    grid = np.full((total_q, 4), -1, np.int64)
    events.sort(key=lambda x: (x[1], x[0]))
    for v, s, e, midi, tie_cont in events:
        if s >= total_q:
            continue
        e = min(e, total_q)
        if midi < C.PITCH_LO or midi > C.PITCH_HI:
            stats["out_of_range_notes_dropped"] += 1
            continue
        cur = grid[s:e, v]
        if (cur >= 0).any():
            stats["overlapping_notes_merged"] += 1
            grid[s:e, v] = np.where(cur < 0, midi, np.minimum(cur, midi) if v == 3 else np.maximum(cur, midi))
        else:
            if not tie_cont and s > 0 and grid[s - 1, v] == midi:
                stats["repeated_notes_merged_into_hold"] += 1
            grid[s:e, v] = midi
    return grid


def finish_piece(grid, stats, name, corpus):
    if grid is None or (grid >= 0).sum() == 0:
        stats["pieces_dropped_empty"] += 1
        return None
    if stats["notes_seen"] and stats["offgrid_notes"] / max(1, stats["notes_seen"]) > OFFGRID_PIECE_LIMIT:
        stats["pieces_dropped_offgrid"] += 1
        return None
    # trim leading/trailing all-silent steps
    nz = np.nonzero((grid >= 0).any(1))[0]
    grid = grid[nz[0] : nz[-1] + 1]
    stats["pieces_kept"] += 1
    return grid


def pick_four(parts):
    """>4 parts: sort by mean pitch (high to low) and keep highest, lowest and two evenly spaced."""
    def mean_pitch(p):
        ps = [n.pitch.midi for n in p.flatten().notes if not n.isChord]
        return sum(ps) / len(ps) if ps else 0

    order = sorted(range(len(parts)), key=lambda i: -mean_pitch(parts[i]))
    n = len(order)
    idx = [order[0], order[round((n - 1) / 3)], order[round(2 * (n - 1) / 3)], order[-1]]
    return [parts[i] for i in idx]


def work(task):
    corpus, name, payload = task
    stats = collections.Counter()
    try:
        from music21 import converter

        if corpus == "folk":
            s = converter.parseData(payload, format="abc")
        else:
            s = converter.parse(payload)
        parts = list(s.parts) if hasattr(s, "parts") and len(s.parts) else [s]
        if corpus == "folk":
            mel = parts[0]
            grid = parts_to_grid([mel], stats)
            if grid is not None:
                g4 = np.full((grid.shape[0], 4), -1, np.int64)
                g4[:, 0] = grid[:, 0]
                grid = g4
            stats["extra_parts_dropped"] += len(parts) - 1
        else:
            if len(parts) < 4:
                stats["pieces_dropped_fewer_than_4_parts"] += 1
                return corpus, name, None, stats
            if len(parts) > 4:
                stats["extra_parts_dropped"] += len(parts) - 4
                stats["pieces_with_more_than_4_parts"] += 1
                parts = pick_four(parts)
            grid = parts_to_grid(parts, stats)
        grid = finish_piece(grid, stats, name, corpus)
        if grid is None:
            return corpus, name, None, stats
        return corpus, name, (grid, C.features(grid)), stats
    except Exception as e:  # bad repeat marks, broken files, ...
        stats["pieces_dropped_parse_error"] += 1
        stats["parse_error:" + type(e).__name__] += 1
        return corpus, name, None, stats


# ---------------------------------------------------------------- task lists
def folk_tunes(path):
    txt = open(path, encoding="latin-1").read()
    chunks = re.split(r"\n(?=X:)", "\n" + txt)
    header = chunks[0] if not chunks[0].lstrip().startswith("X:") else ""
    tunes = [c.strip() + "\n" for c in chunks[1:] if c.strip().startswith("X:")]
    return [(header + t) for t in tunes]


def build_tasks(caps, seed):
    rnd = random.Random(seed)
    base = m21_corpus_dir()
    tasks = []
    # quartets: prefer .mxl where a .krn of the same movement also exists
    q = []
    for comp in ["haydn", "mozart", "beethoven"]:
        files = []
        for dp, _, fs in os.walk(os.path.join(base, comp)):
            for f in fs:
                if f.endswith((".mxl", ".krn", ".xml", ".musicxml")):
                    files.append(os.path.join(dp, f))
        stems = {}
        for f in sorted(files):
            stem = os.path.splitext(f)[0]
            if stem not in stems or f.endswith(".mxl"):
                stems[stem] = f
        q += sorted(stems.values())
    rnd.shuffle(q)
    tasks += [("quartet", os.path.relpath(f, base), f) for f in q[: caps["quartet"]]]
    pal = sorted(
        os.path.join(dp, f)
        for dp, _, fs in os.walk(os.path.join(base, "palestrina"))
        for f in fs
        if f.endswith(".krn")
    )
    rnd.shuffle(pal)
    tasks += [("palestrina", os.path.relpath(f, base), f) for f in pal[: caps["palestrina"]]]
    for sub, cap in (("essenFolksong", caps["essen"]), ("oneills1850", caps["oneill"])):
        tunes = []
        for f in sorted(os.listdir(os.path.join(base, sub))):
            if f.endswith(".abc"):
                for i, t in enumerate(folk_tunes(os.path.join(base, sub, f))):
                    tunes.append((f"{sub}/{f}#{i}", t))
        rnd.shuffle(tunes)
        tasks += [("folk", n, t) for n, t in tunes[:cap]]
    # big files first so the pool finishes evenly
    tasks.sort(key=lambda t: 0 if t[0] == "quartet" else 1)
    return tasks


# ---------------------------------------------------------------- save
def save_corpus(path, grids, names, feats):
    toks, dens, regs, modes, tonics, offs = [], [], [], [], [], [0]
    for g, (d, r, m, k) in zip(grids, feats):
        toks.append(C.grid_to_tokens(g))
        dens.append(d)
        regs.append(r)
        modes.append(m)
        tonics.append(k)
        offs.append(offs[-1] + len(g))
    np.savez_compressed(
        path,
        tokens=np.concatenate(toks) if toks else np.zeros((0, 4), np.int16),
        density=np.concatenate(dens) if dens else np.zeros(0, np.float32),
        register=np.concatenate(regs) if regs else np.zeros(0, np.float32),
        mode=np.concatenate(modes) if modes else np.zeros(0, np.int8),
        tonic=np.concatenate(tonics) if tonics else np.zeros(0, np.int8),
        offsets=np.array(offs, np.int64),
        names=np.array(names),
    )
    return dict(pieces=len(grids), steps=int(offs[-1]), tokens=int(4 * offs[-1] + len(grids)))


def voice_ranges(grids):
    out = {}
    for v, name in enumerate(C.VOICES):
        ps = np.concatenate([g[:, v][g[:, v] >= 0] for g in grids]) if grids else np.zeros(0)
        out[name] = [int(ps.min()), int(ps.max())] if len(ps) else None
    return out


def feature_summary(feats):
    d, r, m = [], [], []
    for a, b, c, _ in feats:
        d.append(a), r.append(b), m.append(c)
    d, r, m = np.concatenate(d), np.concatenate(r), np.concatenate(m)
    r = r[~np.isnan(r)]
    pct = lambda x: {str(p): round(float(np.percentile(x, p)), 3) for p in (1, 5, 50, 95, 99)}
    return dict(
        density_percentiles=pct(d),
        register_percentiles=pct(r) if len(r) else None,
        mode_major_fraction=round(float((m == 1).mean()), 3),
        mode_unknown_fraction=round(float((m == -1).mean()), 3),
    )


def refeature():
    """The features depend on the grid alone, so recomputing them from the saved grids gives what a
    full run would, without parsing music21 again (~10 minutes)."""
    meta_path = os.path.join(OUT, "meta.json")
    meta = json.load(open(meta_path))
    for key, info in meta["corpora"].items():
        fn = f"{key}.npz"
        z = np.load(os.path.join(OUT, fn))
        off = z["offsets"]
        grids = [C.tokens_to_pitch(z["tokens"][off[i] : off[i + 1]]) for i in range(len(off) - 1)]
        feats = [C.features(g) for g in tqdm(grids, desc=key, unit="piece")]
        again = save_corpus(os.path.join(OUT, fn), grids, list(z["names"]), feats)
        assert again["steps"] == info["steps"], f"{fn}: grids changed"
        if "features" in info:
            info["features"] = feature_summary(feats)
    meta["refeatured_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    json.dump(meta, open(meta_path, "w"), indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--quartet", type=int, default=60, help="max quartet movements (all = ~50)")
    ap.add_argument("--palestrina", type=int, default=350)
    ap.add_argument("--essen", type=int, default=700)
    ap.add_argument("--oneill", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--refeature", action="store_true",
                    help="recompute the conditioning features of the grids already in data/ (after a change to "
                         "common.features); the grids, names and drop counts stay as they are")
    args = ap.parse_args()
    if args.refeature:
        return refeature()
    caps = dict(quartet=args.quartet, palestrina=args.palestrina, essen=args.essen, oneill=args.oneill)
    if args.quick:
        caps = dict(quartet=1, palestrina=4, essen=8, oneill=4)
    os.makedirs(OUT, exist_ok=True)
    t0 = time.time()
    meta = dict(caps=caps, seed=args.seed, offgrid_piece_limit=OFFGRID_PIECE_LIMIT, corpora={})

    # ---- JSB: train -> style "chorale"; valid / test kept apart
    jsb = json.load(open(JSB))
    for split in ("train", "valid", "test"):
        grids, names, st = [], [], collections.Counter()
        for i, piece in enumerate(jsb[split]):
            g = np.array([[int(round(x)) for x in step] for step in piece], np.int64)
            bad = (g >= 0) & ((g < C.PITCH_LO) | (g > C.PITCH_HI))
            st["out_of_range_cells_silenced"] += int(bad.sum())
            g[bad] = -1
            grids.append(g)
            names.append(f"jsb/{split}/{i}")
        fn = "chorale.npz" if split == "train" else f"jsb_{split}.npz"
        feats = [C.features(g) for g in grids]
        info = save_corpus(os.path.join(OUT, fn), grids, names, feats)
        info.update(dropped=dict(st), voice_ranges=voice_ranges(grids), source=f"JSB16thSeparated {split} split")
        if split == "train":
            info["features"] = feature_summary(feats)
        key = "chorale" if split == "train" else f"jsb_{split}"
        meta["corpora"][key] = info
        print(f"JSB {split}: {info['pieces']} pieces, {info['steps']} steps, {info['tokens']} tokens")

    # ---- music21 corpora
    tasks = build_tasks(caps, args.seed)
    print(f"music21 tasks: {collections.Counter(t[0] for t in tasks)}")
    results = collections.defaultdict(list)
    stats = collections.defaultdict(collections.Counter)
    with Pool(args.workers, maxtasksperchild=50) as pool:
        for corpus, name, grid, st in tqdm(
            pool.imap_unordered(work, tasks, chunksize=1), total=len(tasks), desc="music21", smoothing=0.05
        ):
            stats[corpus].update(st)
            stats[corpus]["files_tried"] += 1
            if grid is not None:
                results[corpus].append((name, grid))
    for corpus in ["quartet", "palestrina", "folk"]:
        items = sorted(results[corpus], key=lambda x: x[0])
        grids = [g for _, (g, _) in items]
        feats = [f for _, (_, f) in items]
        names = [n for n, _ in items]
        info = save_corpus(os.path.join(OUT, f"{corpus}.npz"), grids, names, feats)
        info.update(dropped=dict(sorted(stats[corpus].items())), voice_ranges=voice_ranges(grids))
        info["features"] = feature_summary(feats) if grids else None
        meta["corpora"][corpus] = info
        print(f"{corpus}: {info['pieces']} pieces, {info['steps']} steps, {info['tokens']} tokens")
        print(f"   counts: {dict(sorted(stats[corpus].items()))}")
    meta["prepare_wall_s"] = round(time.time() - t0, 1)
    json.dump(meta, open(os.path.join(OUT, "meta.json"), "w"), indent=1)
    print(f"done in {meta['prepare_wall_s']} s -> {OUT}/meta.json")


if __name__ == "__main__":
    main()
