"""Export, verify, evaluate and document a trained roomscore composer.

    .venv/bin/python models/train/export.py --name roomscore-satb --run roomscore-satb-2
    .venv/bin/python models/train/export.py --name roomscore-satb-mix --run roomscore-satb-g7 \
        --calibrate --shifts=-1,0    # the same network as a mixture over two transpositions

1. loads models/train/runs/<run>/checkpoints/best.pt (best JSB valid NLL),
2. exports models/<name>.onnx (opset 17) with the key/value cache as explicit inputs/outputs,
3. verifies with onnxruntime: ONNX vs PyTorch logits, incremental (KV-cache) decoding vs a full
   pass, and that an empty cache (P = 0) is accepted,
4. scores JSB train/valid/test by the evaluation protocol (evaluate.py) through the ONNX file,
   and the per-voice unigram / Markov baselines,
5. writes the Rust parity fixture models/fixtures/jsb_test_slice.json (jsb_test_slice.<name>.json
   for another name),
6. writes the model card models/<name>.json (with the .onnx file's sha256).
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import evaluate as E  # noqa: E402
import levers as LV  # noqa: E402
from model import ROPE_BASE, Composer, Decoder, MixDecoder, TransposeMix, checkpoint_path, load_checkpoint, n_params  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.abspath(os.path.join(HERE, ".."))

def cache_names(kind, layers):
    """past_k_0..L-1, past_v_0..L-1 (kind "past") or the same for "new"."""
    return [f"{kind}_k_{i}" for i in range(layers)] + [f"{kind}_v_{i}" for i in range(layers)]


def export(model, path):
    """The graph (model.Decoder) takes the cache one tensor per layer ([1, H, capacity, dh]) with
    past_len, and gives back only the new tokens' keys and values: a graph that returned the
    whole cache copied it twice per token, most of a token's time at full context. The batch
    axis carries guidance's two sequences in one pass."""
    model.eval()
    L, H, Dh = model.layers, model.heads, model.dh
    T, cap = 5, 8  # trace with a cache in use so nothing specialises on an empty one
    args = (
        torch.randint(2, C.VOCAB_SIZE, (1, T)),
        torch.tensor([[0, 1, 2, 3, 0]]),
        torch.rand(1, T, C.COND_DIM),
        torch.tensor([3]),
        *[torch.randn(1, H, cap, Dh) for _ in range(2 * L)],
    )
    dynamic = {n: {0: "B", 1: "T"} for n in ("tokens", "voices", "cond", "logits")}
    dynamic.update({n: {0: "B", 2: "capacity"} for n in cache_names("past", L)})
    dynamic.update({n: {0: "B", 2: "T"} for n in cache_names("new", L)})
    graph = MixDecoder(model) if isinstance(model, TransposeMix) else Decoder(model)
    torch.onnx.export(
        graph.eval(), args, path, opset_version=17,
        input_names=["tokens", "voices", "cond", "past_len"] + cache_names("past", L),
        output_names=["logits"] + cache_names("new", L),
        dynamic_axes=dynamic, do_constant_folding=True,
    )


def op_types(path):
    try:
        import onnx

        m = onnx.load(path)
        return sorted({n.op_type for n in m.graph.node})
    except ImportError:
        return None


def scaled_products(path):
    """The names of the products ONNX Runtime's optimiser turns into FusedMatMul with an alpha
    other than 1. A scale left in front of a product gets fused that way, and that kernel ran the
    cached attention product 3.5x slower (models/README.md, session 16); the graph carries the
    attention scale in its query weights instead, and this keeps it so."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath).graph
    return [n.name for n in graph.node if n.op_type == "FusedMatMul"
            and any(a.name == "alpha" and abs(a.f - 1.0) > 1e-6 for a in n.attribute)]


def verify(model, sess, tok, voi, cond):
    """tok/voi [N] int64, cond [N,C] float32 -> dict of max abs diffs."""
    L, H, Dh = model.layers, model.heads, model.dh
    N = len(tok)
    pk0, pv0 = E.empty_past(L, H, Dh)
    full, fk, fv = E.run(sess, tok[None], voi[None], cond[None], pk0, pv0)
    with torch.no_grad():
        tk, tv = model.empty_cache(1)
        tl, tpk, tpv = model(torch.from_numpy(tok[None]), torch.from_numpy(voi[None]), torch.from_numpy(cond[None]), tk, tv)
    d_torch = float(np.abs(full - tl.numpy()).max())
    d_torch_kv = float(max(np.abs(fk - tpk.numpy()).max(), np.abs(fv - tpv.numpy()).max()))
    # incremental: chunks of 1 (BOS alone, P=0), then 1-token steps, then 4-token steps, then the rest
    sizes = [1] + [1] * 7 + [4] * 8
    inc, pk, pv, i = [], pk0, pv0, 0
    for sz in sizes + [N]:
        if i >= N:
            break
        j = min(N, i + sz)
        lg, pk, pv = E.run(sess, tok[None, i:j], voi[None, i:j], cond[None, i:j], pk, pv)
        inc.append(lg)
        i = j
    inc = np.concatenate(inc, axis=1)
    d_inc = float(np.abs(inc - full).max())
    d_inc_kv = float(max(np.abs(pk - fk).max(), np.abs(pv - fv).max()))
    # rollback: truncate the cache to position r and decode again -> same logits
    r = N // 2
    lg, _, _ = E.run(sess, tok[None, r:], voi[None, r:], cond[None, r:],
                     np.ascontiguousarray(fk[:, :, :, :r]), np.ascontiguousarray(fv[:, :, :, :r]), cache=False)
    d_roll = float(np.abs(lg - full[:, r:]).max())
    # the same from a cache of the whole length whose positions from r on hold noise: past_len
    # alone must say what is in use
    noise = np.random.default_rng(0).standard_normal(fk.shape).astype(np.float32)
    nk, nv = noise.copy(), noise[::-1].copy()
    nk[:, :, :, :r], nv[:, :, :, :r] = fk[:, :, :, :r], fv[:, :, :, :r]
    lg, _, _ = E.run(sess, tok[None, r:], voi[None, r:], cond[None, r:], nk, nv, cache=False, past_len=r)
    d_masked = float(np.abs(lg - full[:, r:]).max())
    return dict(onnx_vs_torch_logits_max_abs=d_torch, onnx_vs_torch_cache_max_abs=d_torch_kv,
                incremental_vs_full_logits_max_abs=d_inc, incremental_vs_full_cache_max_abs=d_inc_kv,
                truncated_cache_vs_full_logits_max_abs=d_roll,
                noise_beyond_past_len_vs_full_logits_max_abs=d_masked, n_tokens=N)


def verify_batch(sess, L, H, Dh, tok, voi, cond_a, cond_b):
    """A batch of two (guidance's pair: the same tokens, two conditionings) against each alone,
    over a prefix and then one more token with the prefix cached -> max abs logits diff."""
    n = len(tok) - 1
    tt, vv = np.stack([tok, tok]), np.stack([voi, voi])
    cc = np.stack([cond_a, cond_b])
    pk, pv = E.empty_past(L, H, Dh)
    pk2, pv2 = np.concatenate([pk, pk], 1), np.concatenate([pv, pv], 1)
    both, bk, bv = E.run(sess, tt[:, :n], vv[:, :n], cc[:, :n], pk2, pv2)
    step, _, _ = E.run(sess, tt[:, n:], vv[:, n:], cc[:, n:], bk, bv, cache=False)
    diff = 0.0
    for b in range(2):
        alone, ak, av = E.run(sess, tt[b:b + 1, :n], vv[b:b + 1, :n], cc[b:b + 1, :n], pk, pv)
        one, _, _ = E.run(sess, tt[b:b + 1, n:], vv[b:b + 1, n:], cc[b:b + 1, n:], ak, av, cache=False)
        diff = max(diff, float(np.abs(alone[0] - both[b]).max()), float(np.abs(one[0] - step[b]).max()))
    return diff


def fixture_path(name):
    """The Rust parity fixture of the model `name`: the shipped model's keeps its first name."""
    tail = "" if name == "roomscore-satb" else f".{name}"
    return os.path.join(MODELS, "fixtures", f"jsb_test_slice{tail}.json")


def train_wall_minutes(run):
    """First 'start:' to last 'done:' line of runs/<name>/train.log (includes valid evals, resumes' gaps)."""
    path = os.path.join(run, "train.log")
    if not os.path.exists(path):
        return None
    t0 = t1 = None
    for line in open(path):
        ts = line.split(" ", 1)[0]
        if " start: " in line and t0 is None:
            t0 = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")
        if " done: " in line:
            t1 = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")
    return round((t1 - t0).total_seconds() / 60, 1) if t0 and t1 else None


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def chorale_share(tr_args):
    """The share of training windows drawn from the JSB train split, from the run's --weights."""
    w = {k: float(v) for k, v in (kv.split("=") for kv in tr_args.get("weights", "chorale=1").split(","))}
    return w.get("chorale", 0.0) / sum(w.values())


def valid_components(model, ctx):
    """Each scored JSB valid target's logits by the eval protocol, [K, N, V] (K = 1 for a plain
    model; a TransposeMix's K shifts, in the original token order), and the targets [N]."""
    if not isinstance(model, TransposeMix):
        logits, y = LV.valid_logits(model, ctx)
        return logits[None], y
    return LV.valid_logits(model, ctx, components=True)


def mixture_nll(comps, y, t):
    """Mean NLL of targets y [N] under the mixture of components [K, N, V], each shift's logits
    divided by the temperature t before mixing."""
    lp = torch.logsumexp(torch.log_softmax(comps / t, -1), 0) - float(np.log(comps.shape[0]))
    return float(-lp.gather(1, y[:, None]).mean())


def calibrate(model, ctx):
    """Temperature scaling: the one temperature that minimises JSB valid NLL (never test), folded
    into the output layer (weights and bias divided by it), so the graph, the engine and every
    figure see the calibrated logits with no extra op. A model trained long on a small split is
    overconfident; stage 6 measured 0.3499 at 1.05 against 0.3516 at 1.0. Under a transposition
    mixture the temperature acts on each shift before they are mixed, where the output layer
    sits, and the mixture is less overconfident than one shift, so it is fitted on the mixture."""
    comps, y = valid_components(model, ctx)
    k = comps.shape[0]

    def nll(t):
        return mixture_nll(comps, y, t)

    grid = [round(0.8 + 0.01 * i, 2) for i in range(51)]
    best = min(grid, key=nll)
    head = model.model.head if isinstance(model, TransposeMix) else model.head
    with torch.no_grad():
        head.weight /= best
        head.bias /= best
    out = dict(temperature=best, valid_nll_before=round(nll(1.0), 5), valid_nll_after=round(nll(best), 5),
               method="grid 0.80..1.30 step 0.01 on JSB valid by the eval protocol (PyTorch); logits / temperature, "
                      "folded into the output layer" + (" (each shift's, before the mixture)" if k > 1 else ""))
    print("calibration:", json.dumps(out))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="roomscore-satb", help="the model's file names under models/")
    ap.add_argument("--run", default=None, help="the training run under runs/ (default: --name)")
    ap.add_argument("--checkpoint", default=None, help="default runs/<run>/checkpoints/best.pt")
    ap.add_argument("--random-init", action="store_true", help="pipeline test without a checkpoint")
    ap.add_argument("--skip-train-eval", action="store_true", help="do not score the JSB train split")
    ap.add_argument("--calibrate", action="store_true",
                    help="fit one logit temperature on JSB valid and fold it into the output layer")
    ap.add_argument("--shifts", default="0",
                    help="comma-separated semitone shifts of a transposition mixture (model.TransposeMix), "
                         "e.g. -1,0,1; 0 alone exports the network as it is")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = os.path.join(HERE, "runs", args.run or args.name)
    t_start = time.time()
    if args.random_init:
        ck = None
        cfg = dict(vocab=C.VOCAB_SIZE, n_voice=C.N_VOICE_IDS, cond_dim=C.COND_DIM, d=192, layers=4, heads=4, ff=768,
                   max_pos=1024, dropout=0.1)
        model = Composer(**cfg)
        model.eval()
    else:
        model, ck = load_checkpoint(args.checkpoint or checkpoint_path(args.run or args.name))
        cfg = ck["cfg"]
    ctx = ck["args"]["ctx"] if ck is not None else 384
    shifts = [int(x) for x in args.shifts.split(",")]
    base = model
    if shifts != [0]:
        model = TransposeMix(base, shifts).eval()
    calibration = calibrate(model, ctx) if args.calibrate else None
    L, H, Dh = model.layers, model.heads, model.dh
    onnx_path = os.path.join(MODELS, f"{args.name}.onnx")
    export(model, onnx_path)
    print(f"exported {onnx_path} ({os.path.getsize(onnx_path)/1e6:.2f} MB)")
    sess = E.session(onnx_path)

    # ---- verification on the first test piece, with a conditioning vector that varies per token
    test = E.load_jsb("test")
    tok, voi, step = C.piece_sequence(test[0])
    tok, voi, step = tok[:ctx], voi[:ctx], step[:ctx]
    g = C.tokens_to_pitch(test[0])
    d, r, m, k = C.features(g)
    cond = C.cond_arrays(d[step], r[step], m[step], 0, tonic=k[step])
    ver = verify(model, sess, tok, voi, cond)
    ver_eval = verify(model, sess, tok, voi, np.broadcast_to(C.eval_cond(), (len(tok), C.COND_DIM)).copy())
    ver["eval_cond_incremental_vs_full_logits_max_abs"] = ver_eval["incremental_vs_full_logits_max_abs"]
    ver["batch_of_two_vs_alone_logits_max_abs"] = verify_batch(
        sess, L, H, Dh, tok[:64], voi[:64], cond[:64],
        np.broadcast_to(C.eval_cond(), (64, C.COND_DIM)).astype(np.float32))
    ver["eval_cond_onnx_vs_torch_logits_max_abs"] = ver_eval["onnx_vs_torch_logits_max_abs"]
    fused = scaled_products(onnx_path)
    ver["scaled_fused_products"] = len(fused)
    assert not fused, f"ONNX Runtime fuses a scale into {fused}"
    print("verification:", json.dumps(ver, indent=1))

    # ---- evaluation through ONNX
    dims = (L, H, Dh)
    figures = {}
    for split in (["test", "valid"] + ([] if args.skip_train_eval else ["train"])):
        t0 = time.time()
        nll, n = E.score_split(sess, E.load_jsb(split), ctx, dims, desc=split)
        figures[f"jsb_{split}_nll"] = round(nll, 5)
        figures[f"jsb_{split}_tokens_scored"] = n
        print(f"JSB {split}: {nll:.4f} nats/token over {n} tokens ({time.time()-t0:.0f}s)")
    bu, bm = E.baselines(E.load_jsb("train"), test)
    figures["baseline_per_voice_unigram_test_nll"] = round(bu, 4)
    figures["baseline_per_voice_markov_test_nll"] = round(bm, 4)
    print(f"baselines (ours, counted on train, scored on test): unigram {bu:.4f}, Markov {bm:.4f}")

    # ---- Rust parity fixture: first 2 test pieces
    fx = dict(
        description="First 2 JSB test pieces scored by the eval protocol through the ONNX file with onnxruntime "
                    "(CPU, 1 thread). cond is the same vector beside every token. windows: [start, end, "
                    "first_scored]; logits at window position i predict sequence position start+i+1. "
                    "reference_logits: piece 0, first window (a fresh full pass from BOS, P=0), positions 0..7.",
        model=f"{args.name}.onnx", context_length=ctx, cond=[float(x) for x in C.eval_cond()], pieces=[],
    )
    tot, cnt = 0.0, 0
    for pi in range(2):
        tk, vc, _ = C.piece_sequence(test[pi])
        t, c, wins = E.score_piece(sess, test[pi], ctx, dims)
        tot += t
        cnt += c
        fx["pieces"].append(dict(index=pi, steps=int(test[pi].shape[0]), tokens=tk.tolist(), voices=vc.tolist(),
                                 windows=wins, nll_sum=t, tokens_scored=c, mean_nll=t / c))
    fx["mean_nll"] = tot / cnt
    fx["tokens_scored"] = cnt
    tk, vc, _ = C.piece_sequence(test[0])
    pk, pv = E.empty_past(L, H, Dh)
    n0 = min(ctx, len(tk))
    lg = E.run(sess, tk[None, :n0], vc[None, :n0],
               np.broadcast_to(C.eval_cond(), (1, n0, C.COND_DIM)).astype(np.float32), pk, pv, cache=False)[0][0]
    fx["reference_logits"] = [[round(float(x), 6) for x in lg[i]] for i in range(8)]
    # Conditioning vectors as Python builds them, for the engine's cond_vector to match.
    fx["cond_cases"] = [
        dict(density=dn, register=rg, mode=md, style=st, tonic=tn,
             vector=[float(x) for x in C.cond_vector(density=dn, register=rg, mode=md, style=st, tonic=tn)])
        for dn, rg, md, st, tn in [
            (3.0, 64.0, 1, "chorale", 2), (None, None, 0, "folk", 9), (1.5, 70.0, 0.5, "quartet", 11),
            (None, None, 0, "chorale", None), (None, None, None, "chorale", 4), (None, None, None, None, None),
        ]
    ]
    # Training builds its vectors with cond_arrays, the engine mirrors cond_vector: they must agree,
    # or the model is played an encoding it never trained on.
    for case in fx["cond_cases"]:
        if case["density"] is None or case["register"] is None or case["style"] is None:
            continue  # cond_arrays always knows density, register and style
        md, tn = case["mode"], case["tonic"]
        row = C.cond_arrays(np.array([case["density"]]), np.array([case["register"]]),
                            np.array([-1 if md is None else md], np.float32), C.STYLES.index(case["style"]),
                            tonic=None if tn is None else np.array([tn]))[0]
        assert np.allclose(row, case["vector"], atol=1e-6), f"cond_arrays and cond_vector disagree on {case}"
    # The mixture moves each conditioning vector inside the graph: it must move it as cond_vector
    # builds the vector of the transposed music, or a shift hears another key than the room asked.
    if shifts != [0]:
        mats, lo, hi = (t.numpy() for t in (model.cond_mats, model.cond_lo, model.cond_hi))
        for case in fx["cond_cases"]:
            for i, k in enumerate(shifts):
                moved = np.clip(np.asarray(case["vector"], np.float32) @ mats[i], lo, hi)
                want = C.cond_vector(
                    density=case["density"], mode=case["mode"], style=case["style"],
                    register=None if case["register"] is None else case["register"] + k,
                    tonic=None if case["tonic"] is None else (case["tonic"] + k) % 12)
                assert np.allclose(moved, want, atol=1e-6), f"shift {k} moves {case} wrongly"
    os.makedirs(os.path.join(MODELS, "fixtures"), exist_ok=True)
    json.dump(fx, open(fixture_path(args.name), "w"))
    print(f"fixture: 2 pieces, {cnt} tokens, mean NLL {fx['mean_nll']:.5f}")

    # ---- model card
    meta = json.load(open(os.path.join(HERE, "data", "meta.json")))
    summary = json.load(open(os.path.join(run, "summary.json"))) if os.path.exists(os.path.join(run, "summary.json")) else {}
    ranges = {}
    for v in C.VOICES:
        lo = [meta["corpora"][k]["voice_ranges"][v][0] for k in meta["corpora"] if meta["corpora"][k]["voice_ranges"].get(v)]
        hi = [meta["corpora"][k]["voice_ranges"][v][1] for k in meta["corpora"] if meta["corpora"][k]["voice_ranges"].get(v)]
        ranges[v] = [min(lo), max(hi)] if lo else None
    tr_args = ck["args"] if ck is not None else {}
    card = dict(
        name=args.name,
        training_run=args.run or args.name,
        format_version=2,
        file=f"{args.name}.onnx",
        sha256=sha256(onnx_path),
        size_bytes=os.path.getsize(onnx_path),
        created_utc=datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
        representation=dict(
            grid="16th notes (4 steps per quarter-note beat), 4 voices",
            scan="raster: for each step, soprano, alto, tenor, bass tokens; the sequence starts with one BOS token",
            holds="a voice whose token equals its token on the previous step holds the note (no separate repeat token)",
        ),
        vocabulary=dict(
            size=C.VOCAB_SIZE, silence=C.SILENCE, bos=C.BOS, pitch_offset=C.PITCH_OFFSET, pitch_min=C.PITCH_LO,
            pitch_max=C.PITCH_HI,
            pitch_to_token=f"token = {C.PITCH_OFFSET} + (midi - {C.PITCH_LO}) for midi in [{C.PITCH_LO}, {C.PITCH_HI}]",
        ),
        voices=dict(
            names=C.VOICES, ids={v: i for i, v in enumerate(C.VOICES)}, start_id=C.VOICE_START, n_ids=C.N_VOICE_IDS,
            note="voices[i] is the voice of tokens[i]: 0..3 = S,A,T,B, 4 = the BOS position",
            ranges_seen_in_training_data_before_transposition=ranges,
            ranges_by_corpus={k: meta["corpora"][k]["voice_ranges"] for k in meta["corpora"]},
            transposition_augmentation_semitones=[-tr_args.get("transpose", 5), tr_args.get("transpose", 5)],
        ),
        styles=C.STYLES,
        conditioning=dict(
            dim=C.COND_DIM,
            names=C.COND_NAMES,
            unknown="flag 0 and value 0; style all zeros = unknown; the all-zero vector = unconditional",
            density=dict(
                index=0, known_flag_index=1, unit="onsets per beat (beat = quarter note = 4 steps)",
                definition=f"onsets over all four voices in steps [t-{C.DENSITY_HALF}, t+{C.DENSITY_HALF}) clipped to the piece, "
                           "divided by (window steps / 4); an onset is a sounding cell whose pitch differs from the same "
                           "voice's previous step (or step 0)",
                normalise=f"clip((density - {C.DENSITY_RANGE[0]}) / ({C.DENSITY_RANGE[1]} - {C.DENSITY_RANGE[0]}), 0, 1)",
                range=list(C.DENSITY_RANGE), window_steps=2 * C.DENSITY_HALF),
            register=dict(
                index=2, known_flag_index=3, unit="MIDI pitch",
                definition=f"mean MIDI pitch over all sounding (voice, step) cells in steps [t-{C.DENSITY_HALF}, t+{C.DENSITY_HALF}) "
                           "clipped to the piece; unknown if nothing sounds",
                normalise=f"clip((register - {C.REGISTER_RANGE[0]}) / ({C.REGISTER_RANGE[1]} - {C.REGISTER_RANGE[0]}), 0, 1)",
                range=list(C.REGISTER_RANGE), window_steps=2 * C.DENSITY_HALF),
            mode=dict(
                index=4, known_flag_index=5, unit="1 = major, 0 = minor",
                definition=f"Krumhansl-Schmuckler: duration-weighted pitch-class histogram (one count per sounding (voice, step) "
                           f"cell) over steps [t-{C.MODE_HALF}, t+{C.MODE_HALF}) clipped to the piece; Pearson correlation "
                           "with the 12 rotations of each profile (profile[(pc - tonic) % 12]); major if the best major "
                           "correlation >= the best minor one; unknown if nothing sounds",
                ks_major=C.KS_MAJOR.tolist(), ks_minor=C.KS_MINOR.tolist(), window_steps=2 * C.MODE_HALF),
            style=dict(indices=[C.COND_NAMES.index(f"style_{s}") for s in C.STYLES], order=C.STYLES, note="weights (one-hot in training; may be interpolated)"),
            tonic=dict(
                indices=list(range(C.TONIC_INDEX, C.TONIC_INDEX + 12)), known_flag_index=C.TONIC_INDEX + 12,
                order=C.PITCH_CLASSES, unit="pitch class of the key's tonic, one-hot (0 = C)",
                definition="the tonic of the best-correlating Krumhansl-Schmuckler profile rotation (major or minor, "
                           "whichever the mode picked) over the mode's window; moved with the transposition; unknown "
                           "if nothing sounds",
                window_steps=2 * C.MODE_HALF),
            key=dict(
                indices=list(range(C.KEY_INDEX, C.KEY_INDEX + 12)), order=C.PITCH_CLASSES,
                unit="the key as a pitch-class profile, each in [0, 1]",
                definition="known only when mode and tonic both are (else all zero): column pc = m * major[(pc - tonic) "
                           "% 12] + (1 - m) * minor[(pc - tonic) % 12], m the mode value (1 major, 0 minor), major/minor "
                           "the Krumhansl-Schmuckler profiles scaled to [0, 1] by (p - min) / (max - min)",
                major=C.KEY_MAJOR.tolist(), minor=C.KEY_MINOR.tolist()),
            per_token="cond[0, i] describes the step of token i (the BOS position uses step 0)",
            training_dropout="per training window: with p=0.1 the whole vector is zeroed; otherwise each of density, "
                             "register, mode, style, tonic is zeroed independently with p=0.3; the key profile is zeroed "
                             "wherever mode or tonic was",
            eval_vector=[float(x) for x in C.eval_cond()],
        ),
        context_length=ctx,
        max_positions=cfg["max_pos"],
        positions="rotary; positions of the T new tokens are past_len .. past_len+T-1; keep past_len+T <= "
                  "context_length (trained length); when the cache is full, slide it: drop its oldest positions and "
                  "rotate every kept key back by as many positions (see rotary), so the first kept token reads as "
                  "position 0",
        rotary=dict(base=float(ROPE_BASE), pairs="halves",
                    note="key dims i and i + head_dim/2 rotate together by position * inv_freq[i], inv_freq[i] = "
                         "base ** (-i / (head_dim/2))"),
        onnx=dict(
            opset=17,
            inputs=[
                dict(name="tokens", dtype="int64", shape=["B", "T"]),
                dict(name="voices", dtype="int64", shape=["B", "T"]),
                dict(name="cond", dtype="float32", shape=["B", "T", C.COND_DIM]),
                dict(name="past_len", dtype="int64", shape=[1]),
                *[dict(name=n, dtype="float32", shape=["B", H, "capacity", Dh]) for n in cache_names("past", L)],
            ],
            outputs=[
                dict(name="logits", dtype="float32", shape=["B", "T", C.VOCAB_SIZE]),
                *[dict(name=n, dtype="float32", shape=["B", H, "T", Dh]) for n in cache_names("new", L)],
            ],
            cache="one key and one value buffer per layer, [B, heads, capacity, head_dim], of which the first "
                  "past_len positions are in use (the rest is masked, whatever it holds): past_k_0..L-1 then "
                  "past_v_0..L-1 in; out, only the T new tokens' keys and values, new_k_0..L-1 then new_v_0..L-1, "
                  "[B, heads, T, head_dim], which the caller writes at positions past_len .. past_len+T-1",
            batch="B sequences of the same length in one pass, each its own tokens, conditioning and cache; "
                  "the engine sends guidance's conditioned and unconditional sequences as a batch of two",
            empty_cache="past_len = 0 with a capacity of 1 (one masked position)",
            rollback="lower past_len to the kept prefix length and decode again",
            op_types=op_types(onnx_path),
        ),
        architecture=dict(type="decoder-only transformer, pre-LayerNorm, rotary positions, GELU (tanh) MLP",
                          layers=L, heads=base.heads, head_dim=Dh, d_model=cfg["d"], ff=cfg["ff"],
                          params=n_params(base), inputs="token embedding + voice embedding + Linear(cond)"),
        transposition_mix=None if shifts == [0] else dict(
            shifts=shifts, cache_heads=H,
            definition="the graph runs the network once per shift k on the input moved by k semitones (pitch tokens "
                       "+k, clamped to the vocabulary; register +k semitones where known, clipped as the "
                       "conditioning clips it; tonic and key profile rotated by k), moves each next-token "
                       "distribution back by -k (a token whose move leaves the vocabulary gets none of that shift's "
                       "mass; each shift normalised over the tokens it reaches) and outputs the log of their mean: "
                       "the logits output holds log-probabilities",
            cache="the K shifts' caches folded into the head axis: [B, K*heads, capacity, head_dim], shift-major",
            cost="K sequences per pass (2K under guidance)"),
        training_data=dict(
            corpora=meta["corpora"], caps=meta["caps"], offgrid_piece_limit=meta["offgrid_piece_limit"],
            sampling_weights=tr_args.get("weights"),
            notes="chorale = JSB train split only; jsb_valid used for model selection, jsb_test only for the reported "
                  "figure; no other Bach chorales. music21 corpora parsed offline (music21 10.5.1); off-grid notes "
                  "snapped to the nearest 16th when they keep a length, else dropped; pieces with > 10% off-grid notes "
                  "dropped; chords reduced to the top note (bottom for the bass); > 4 parts: highest, lowest and two "
                  "evenly spaced by mean pitch; folk melody in soprano, other voices silent.",
            prepare_wall_s=meta.get("prepare_wall_s"),
        ),
        splits=dict(jsb_train=dict(pieces=229, steps=55228), jsb_valid=dict(pieces=76, steps=18408),
                    jsb_test=dict(pieces=77, steps=18900)),
        training=dict(
            checkpoint=("RANDOM INIT (pipeline test)" if ck is None else
                        f"best JSB valid NLL, rebuilt from {ck['recovered_from']} by recover.py" if ck.get("recovered_from")
                        else "best JSB valid NLL"),
            selected_step=ck["step"] if ck is not None else None,
            steps=summary.get("steps"), tokens_seen=summary.get("tokens"),
            train_minutes=summary.get("train_minutes"), tokens_per_s=round(summary["tokens_per_s"]) if summary.get("tokens_per_s") else None,
            final_train_loss_running=summary.get("final_train_loss_running"),
            train_loss_note="running mean of the training loss (EMA 0.98) with dropout, condition dropout and transposition",
            best_valid_nll_torch=summary.get("best_valid_nll"), history=summary.get("history"),
            initialised_from=summary.get("parent"),
            hyperparameters=tr_args,
            # Runs before train.py recorded its machine all trained here, on the CPU.
            machine=summary.get("machine") or (
                "a GPU (train.py --device cuda); the machine was not recorded" if tr_args.get("device") == "cuda"
                else f"{platform.machine()} CPU ({os.cpu_count()} cores, shared with concurrent Rust builds), no GPU; "
                     f"torch {torch.__version__} (Debian python3-torch) with torch.set_num_threads(2)"),
            wall_minutes_including_evals=train_wall_minutes(run),
            epochs_jsb_equivalent=(round(summary["tokens"] * chorale_share(tr_args) / 221141, 2)
                                   if summary.get("tokens") else None),
        ),
        evaluation=dict(
            protocol="mean NLL per token (nats), teacher-forced, through this ONNX file with onnxruntime: sequence = BOS + "
                     "raster S,A,T,B tokens of the piece; every token after BOS scored once; conditioning unknown "
                     "(all flags 0) and style = chorale one-hot at every position; windows of context_length: starts "
                     "0, ctx/2, ctx, ... while start+ctx < L, plus a last window [L-ctx, L); each window a fresh full "
                     "pass (P=0, positions from 0, no BOS inserted); a target is scored by the first window that "
                     "contains it; figure = total nats / total scored tokens over the split",
            figures=figures,
            published_test_nll=dict(per_voice_unigram=2.639, per_voice_markov=0.983, transformer_huang2019=0.417,
                                    music_transformer_huang2019=0.335),
            baselines_note="ours: unigram add-1 per voice; Markov interpolated with the unigram (weight 1); counted on "
                           "JSB train, scored on test; the published ones come from SOURCE.md",
            verification=ver,
        ),
        calibration=calibration,
        export_wall_s=round(time.time() - t_start, 1),
    )
    card_path = os.path.join(MODELS, f"{args.name}.json")
    json.dump(card, open(card_path, "w"), indent=1)
    print(f"card: {card_path}; sha256 {card['sha256']}")
    # The engine reads card format 3: the same graph with the rotary position as an input of its
    # own, so that its cache can be a ring (ring.py says why, and checks the two agree).
    import ring

    ring.rewrite(onnx_path)


if __name__ == "__main__":
    main()
