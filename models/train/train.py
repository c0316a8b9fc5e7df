"""Train roomscore's composer on the prepared corpora (see prepare.py).

    .venv/bin/python models/train/train.py --name roomscore-satb --budget-min 75
    .venv/bin/python models/train/train.py --name roomscore-satb --resume   # continue after a stop
    .venv/bin/python models/train/train.py --name roomscore-satb-2 --init-from roomscore-satb --lr 4e-4
        # a second stage: the first run's best weights, a fresh optimizer and a new schedule

Training is sized by wall-clock time: the learning rate follows warm-up then cosine decay over
--budget-min minutes of training time (evaluation excluded), and training stops when the budget is
spent. Every --eval-every-min minutes the JSB *valid* split is scored with the evaluation protocol
(common.eval_windows, conditioning unknown, style chorale); the best valid NLL is kept as
checkpoints/best.pt (model selection), and checkpoints/last.pt allows --resume.
Logs go to models/train/runs/<name>/train.log (committed); checkpoints are git-ignored.
"""
import argparse
import json
import math
import os
import platform
import signal
import sys
import time

# On a machine shared with other builds, OpenMP threads that spin at barriers waste the cores. A
# passive wait policy measured 2,300-2,500 tok/s against 630-1,000 with the default, under the same
# load (load average ~6.4 on 2 cores). Must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from model import Composer, TransposeMix, checkpoint_path, load_checkpoint, n_params, read_checkpoint  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")


# ---------------------------------------------------------------- data
STYLE_COLS = [C.COND_NAMES.index(f"style_{s}") for s in C.STYLES]
MODE_COLS = [C.COND_NAMES.index("mode"), C.COND_NAMES.index("mode_known")]
TONIC_COLS = list(range(C.TONIC_INDEX, C.TONIC_INDEX + 13))
# Rows of a batch the distillation teacher reads at once (it runs under no_grad; memory, not speed).
TEACHER_ROWS = 8


class Corpus:
    def __init__(self, path, style_idx):
        z = np.load(path)
        self.style_idx = style_idx
        off = z["offsets"]
        self.pieces = []
        for i in range(len(off) - 1):
            a, b = off[i], off[i + 1]
            tok, voi, step = C.piece_sequence(z["tokens"][a:b])
            self.pieces.append(
                dict(tokens=tok, voices=voi, step=step, density=z["density"][a:b],
                     register=z["register"][a:b], mode=z["mode"][a:b], tonic=z["tonic"][a:b])
            )
        self.n_steps = int(off[-1])

    def build_starts(self, ctx):
        n = np.array([max(1, len(p["tokens"]) - ctx) for p in self.pieces])
        self.cum = np.concatenate([[0], np.cumsum(n)])

    def sample(self, rng, ctx, transpose, cond_drop, bos_share=0.0, style_only_share=0.0, mode_only_share=0.0):
        if bos_share > 0 and rng.random() < bos_share:
            # A window from the piece's start: the engine composes from BOS, where only the
            # conditioning can say what key and texture to begin in.
            pi, s = int(rng.integers(len(self.pieces))), 0
        else:
            g = int(rng.integers(self.cum[-1]))
            pi = int(np.searchsorted(self.cum, g, side="right") - 1)
            s = g - self.cum[pi]
        p = self.pieces[pi]
        e = min(len(p["tokens"]), s + ctx + 1)
        tok = p["tokens"][s:e].copy()
        voi = p["voices"][s:e]
        step = p["step"][s:e]
        shift = 0
        if transpose:
            pitched = tok >= C.PITCH_OFFSET
            if pitched.any():
                lo = int(tok[pitched].min()) - C.PITCH_OFFSET + C.PITCH_LO
                hi = int(tok[pitched].max()) - C.PITCH_OFFSET + C.PITCH_LO
                ks = [k for k in range(-transpose, transpose + 1) if lo + k >= C.PITCH_LO and hi + k <= C.PITCH_HI]
                shift = int(rng.choice(ks))
                tok[pitched] += shift
        cond = C.cond_arrays(p["density"][step], p["register"][step], p["mode"][step], self.style_idx, shift,
                             p["tonic"][step])
        if cond_drop:
            if style_only_share > 0 and rng.random() < style_only_share:
                # The benchmark's conditioning (style known, all else unknown), which the
                # per-group dropout below reaches in under 1 % of windows.
                style = cond[:, STYLE_COLS]  # a copy: fancy indexing
                cond[:] = 0
                cond[:, STYLE_COLS] = style
            elif rng.random() < 0.1:
                cond[:] = 0
            else:
                # The mode without its tonic: what a room asks when it names a mode but no key. The
                # per-group dropout alone gives it in 13-19 % of windows, and the model read the
                # mode bit alone weakly (cond_probe.py: 0.002 nats against 0.011 beside a tonic).
                mode_only = mode_only_share > 0 and rng.random() < mode_only_share
                for cols in ([0, 1], [2, 3], MODE_COLS, STYLE_COLS, TONIC_COLS):
                    drop = rng.random() < 0.3
                    if mode_only and cols is MODE_COLS:
                        drop = False
                    elif mode_only and cols is TONIC_COLS:
                        drop = True
                    if drop:
                        cond[:, cols] = 0
            C.refresh_key(cond)
        return tok, voi, cond


def make_batch(corpora, weights, rng, B, ctx, transpose=5, cond_drop=True, bos_share=0.0, style_only_share=0.0,
               mode_only_share=0.0):
    X = np.zeros((B, ctx), np.int64)
    V = np.full((B, ctx), C.VOICE_START, np.int64)
    Y = np.full((B, ctx), -100, np.int64)
    Cc = np.zeros((B, ctx, C.COND_DIM), np.float32)
    ci = rng.choice(len(corpora), size=B, p=weights)
    for b in range(B):
        tok, voi, cond = corpora[ci[b]].sample(rng, ctx, transpose, cond_drop, bos_share, style_only_share,
                                               mode_only_share)
        n = len(tok) - 1
        X[b, :n] = tok[:-1]
        V[b, :n] = voi[:-1]
        Cc[b, :n] = cond[:-1]
        Y[b, :n] = tok[1:]
    return torch.from_numpy(X), torch.from_numpy(V), torch.from_numpy(Cc), torch.from_numpy(Y)


# ---------------------------------------------------------------- evaluation (torch)
@torch.no_grad()
def score_split(model, path, ctx, batch=16, desc="valid"):
    """Mean NLL per token (nats) on a JSB split by the eval protocol (common.eval_windows),
    conditioning unknown, style chorale. Returns (nll, n_tokens)."""
    model.eval()
    dev = model.cos_t.device
    z = np.load(path)
    off = z["offsets"]
    cvec = torch.from_numpy(C.eval_cond())
    jobs = []  # (tokens, voices, first_scored_in_window)
    for i in range(len(off) - 1):
        tok, voi, _ = C.piece_sequence(z["tokens"][off[i] : off[i + 1]])
        for s, e, f in C.eval_windows(len(tok), ctx):
            jobs.append((tok[s:e], voi[s:e], f - s))
    jobs.sort(key=lambda j: len(j[0]))
    total, count = 0.0, 0
    for k in range(0, len(jobs), batch):
        grp = jobs[k : k + batch]
        T = max(len(j[0]) for j in grp)
        X = torch.zeros(len(grp), T, dtype=torch.long)
        V = torch.full((len(grp), T), C.VOICE_START, dtype=torch.long)
        Y = torch.full((len(grp), T), -100, dtype=torch.long)
        for b, (t, v, f) in enumerate(grp):
            n = len(t)
            X[b, :n] = torch.from_numpy(t)
            V[b, :n] = torch.from_numpy(v)
            # logits at window pos i predict window pos i+1; score window targets f..n-1
            Y[b, f - 1 : n - 1] = torch.from_numpy(t[f:n])
        X, V, Y = X.to(dev), V.to(dev), Y.to(dev)
        cond = cvec.to(dev).expand(len(grp), T, C.COND_DIM)
        pk, pv = model.empty_cache(len(grp))
        logits, _, _ = model(X, V, cond, pk, pv)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((Y != -100).sum())
    model.train()
    return total / count, count


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="roomscore-satb")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", default=None,
                    help="start from the best weights of runs/<NAME> (fresh optimizer and schedule; the parent's "
                         "summary is kept in this run's summary)")
    ap.add_argument("--budget-min", type=float, default=75.0, help="training wall time (minutes)")
    ap.add_argument("--eval-every-min", type=float, default=12.0)
    ap.add_argument("--ctx", type=int, default=384)
    ap.add_argument("--d", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ff", type=int, default=768)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--weights", default="chorale=0.6,quartet=0.15,palestrina=0.12,folk=0.13")
    ap.add_argument("--transpose", type=int, default=5)
    ap.add_argument("--bos-share", type=float, default=0.0,
                    help="share of training windows taken from a piece's start (default: starts uniform)")
    ap.add_argument("--style-only-share", type=float, default=0.0,
                    help="share of training windows conditioned on their style alone, everything else unknown: "
                         "the JSB benchmark's conditioning, which the per-group dropout reaches in under 1 %% "
                         "of windows")
    ap.add_argument("--mode-only-share", type=float, default=0.0,
                    help="share of the windows that go through per-group dropout whose mode is kept and tonic "
                         "dropped: the mode alone, which a room asks when it names no key")
    ap.add_argument("--start-weight", type=float, default=1.0,
                    help="loss weight of each window's first --start-tokens targets, where the model has no "
                         "context and only the conditioning can say what to play (1 = plain mean)")
    ap.add_argument("--start-tokens", type=int, default=64)
    ap.add_argument("--cond-lr-mult", type=float, default=1.0,
                    help="learning-rate multiple for the conditioning projection (new zero-initialised columns "
                         "learn faster; the rest of the model keeps --lr)")
    ap.add_argument("--new-lr-mult", type=float, default=1.0,
                    help="learning-rate multiple for the blocks grow.py added to the --init-from run (they start "
                         "as the identity and have everything to learn; the parent's blocks keep --lr)")
    ap.add_argument("--distill-from", default=None,
                    help="a teacher: the best weights of runs/<NAME> read as a transposition mixture "
                         "(model.TransposeMix over --distill-shifts); the loss mixes the data's targets with "
                         "the teacher's distributions, so one network learns what the mixture knows")
    ap.add_argument("--distill-shifts", default="-1,0,1")
    ap.add_argument("--distill-temperature", type=float, default=1.12,
                    help="each shift's logits divided by this before the teacher mixes them (export.py's "
                         "calibration of the shipped mixture)")
    ap.add_argument("--distill-weight", type=float, default=0.5,
                    help="share of the loss that is the cross-entropy against the teacher's distribution")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is lent (sweep.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke tests)")
    ap.add_argument("--no-final-eval", action="store_true", help="smoke tests: skip the final valid pass")
    args = ap.parse_args()
    # SIGTERM (sweep.py's deadline) ends the run as the budget does, with a last evaluation and the
    # summary, so a stopped run keeps its record and the weights it reached.
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        # TF32 matrix products (inputs rounded to a 10-bit mantissa): the matrix units run them
        # several times faster than full float32, and training does not need the lost digits.
        torch.set_float32_matmul_precision("high")

    run = os.path.join(HERE, "runs", args.name)
    ck = os.path.join(run, "checkpoints")
    os.makedirs(ck, exist_ok=True)
    logf = open(os.path.join(run, "train.log"), "a")

    def log(msg):
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {msg}"
        tqdm.write(line)
        logf.write(line + "\n")
        logf.flush()

    wmap = dict(kv.split("=") for kv in args.weights.split(","))
    corpora, weights = [], []
    for si, style in enumerate(C.STYLES):
        path = os.path.join(DATA, f"{style}.npz")
        w = float(wmap.get(style, 0))
        if w <= 0 or not os.path.exists(path):
            continue
        c = Corpus(path, si)
        if not c.pieces:
            continue
        c.build_starts(args.ctx)
        corpora.append(c)
        weights.append(w)
    weights = np.array(weights) / sum(weights)
    valid_path = os.path.join(DATA, "jsb_valid.npz")

    state = None
    if args.resume and os.path.exists(os.path.join(ck, "last.pt")):
        state = read_checkpoint(os.path.join(ck, "last.pt"))
        cfg = state["cfg"]
        args.budget_min = state["args"]["budget_min"] if "budget_min" in state["args"] else args.budget_min
    else:
        cfg = dict(vocab=C.VOCAB_SIZE, n_voice=C.N_VOICE_IDS, cond_dim=C.COND_DIM, d=args.d, layers=args.layers,
                   heads=args.heads, ff=args.ff, max_pos=1024, dropout=args.dropout)
    parent = None
    if state is None and args.init_from:
        pst = read_checkpoint(checkpoint_path(args.init_from))
        cfg = dict(pst["cfg"], dropout=args.dropout, cond_dim=C.COND_DIM)
        psum = os.path.join(HERE, "runs", args.init_from, "summary.json")
        # A parent stopped before its end has no summary; its checkpoint carries the same record.
        parent = json.load(open(psum)) if os.path.exists(psum) else dict(
            steps=pst["step"], tokens=pst["tokens"], best_valid_nll=pst.get("best"), history=pst.get("history"),
            train_minutes=round(pst.get("elapsed", 0.0) / 60, 2), args=pst.get("args"), parent=pst.get("parent"),
            stopped_early=True)
        parent["name"] = args.init_from
    model = Composer(**cfg).to(dev)
    if parent is not None:
        state_dict = pst["model"]
        old = state_dict["cond.weight"]
        if old.shape[1] < C.COND_DIM:
            # New conditioning columns (appended at the end) start at zero: the parent's function
            # is kept exactly, and training teaches the new inputs.
            grown = torch.zeros(old.shape[0], C.COND_DIM)
            grown[:, : old.shape[1]] = old
            state_dict = dict(state_dict, **{"cond.weight": grown})
            parent["cond_dim"] = int(old.shape[1])
        model.load_state_dict(state_dict)
    new_blocks = pst.get("new_blocks", []) if parent is not None else (state or {}).get("new_blocks", [])
    new_prefixes = tuple(f"blocks.{i}." for i in new_blocks)
    cond_params = list(model.cond.parameters())
    # str.startswith(()) is False: without grown blocks every non-cond parameter is in `rest`.
    new_params = [p for n, p in model.named_parameters() if n.startswith(new_prefixes)]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("cond.",) + new_prefixes)]
    groups = [dict(params=rest, lr_mult=1.0), dict(params=cond_params, lr_mult=args.cond_lr_mult)]
    if new_params:
        groups.append(dict(params=new_params, lr_mult=args.new_lr_mult))
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), weight_decay=args.wd)
    rng = np.random.default_rng(args.seed)
    step, elapsed, tokens_seen, best = 0, 0.0, 0, float("inf")
    history = []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
        step, elapsed, tokens_seen, best = state["step"], state["elapsed"], state["tokens"], state["best"]
        history = state["history"]
        parent = state.get("parent")
        log(f"resumed at step {step}, {elapsed/60:.1f} min trained, best valid {best:.4f}")
    else:
        log(f"start: {json.dumps(vars(args))}")
        if parent is not None:
            log(f"init from {args.init_from}: best valid {parent.get('best_valid_nll')}, steps {parent.get('steps')}, "
                f"tokens {parent.get('tokens')}")
        log(f"model: {json.dumps(cfg)} params={n_params(model)}")
        log("corpora: " + ", ".join(f"{C.STYLES[c.style_idx]}: {len(c.pieces)} pieces {c.n_steps} steps w={w:.3f}"
                                     for c, w in zip(corpora, weights)))
    budget = args.budget_min * 60.0

    def save(name, extra=None):
        st = dict(model=model.state_dict(), opt=opt.state_dict(), rng=rng.bit_generator.state,
                  torch_rng=torch.get_rng_state(),
                  cuda_rng=torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
                  step=step, elapsed=elapsed, tokens=tokens_seen, best=best,
                  cfg=cfg, args=vars(args), history=history, parent=parent, new_blocks=new_blocks)
        if extra:
            st.update(extra)
        tmp = os.path.join(ck, name + ".tmp")
        torch.save(st, tmp)
        os.replace(tmp, os.path.join(ck, name))

    def evaluate():
        nonlocal best
        t = time.time()
        v, n = score_split(model, valid_path, args.ctx)
        improved = v < best
        if improved:
            best = v
            save("best.pt")
        history.append(dict(step=step, minutes=round(elapsed / 60, 2), tokens=tokens_seen, valid_nll=round(v, 5),
                             train_nll_running=round(run_loss, 5) if run_loss else None))
        log(f"eval step {step} valid_nll {v:.4f} ({n} tokens, {time.time()-t:.0f}s){' *best*' if improved else ''}")
        save("last.pt")

    teacher = None
    if args.distill_from:
        base, _ = load_checkpoint(checkpoint_path(args.distill_from), dropout=0.0)
        with torch.no_grad():
            base.head.weight /= args.distill_temperature
            base.head.bias /= args.distill_temperature
        shifts = [int(x) for x in args.distill_shifts.split(",")]
        teacher = TransposeMix(base, shifts)
        teacher = teacher.to(dev).eval()
        log(f"teacher: {args.distill_from} as a mixture over shifts {shifts}, temperature "
            f"{args.distill_temperature}, weight {args.distill_weight}")

    model.train()
    run_loss = None
    last_eval = elapsed
    pbar = tqdm(total=int(budget), initial=int(elapsed), unit="s", desc="train", smoothing=0.1)
    t_log = time.time()
    tok_since, t_since = 0, time.time()
    while elapsed < budget and (args.max_steps == 0 or step < args.max_steps) and not stop:
        t0 = time.time()
        X, V, Cc, Y = make_batch(corpora, weights, rng, args.batch, args.ctx, args.transpose,
                                 bos_share=args.bos_share, style_only_share=args.style_only_share,
                                 mode_only_share=args.mode_only_share)
        prog = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (
            args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        X, V, Cc, Y = (t.to(dev) for t in (X, V, Cc, Y))
        pk, pv = model.empty_cache(args.batch)
        logits, _, _ = model(X, V, Cc, pk, pv)
        # mean over the scored targets, a window's first --start-tokens weighted --start-weight
        per_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1), ignore_index=-100,
                                  reduction="none").reshape(Y.shape)
        if teacher is not None:
            # In slices of the batch: with a five-shift teacher, batch 32 and context 512, a step peaked
            # at 10.9 GB read whole, 9.1 GB in slices (7.9 GB without a teacher), on the CPU.
            with torch.no_grad():
                parts = []
                for i in range(0, args.batch, TEACHER_ROWS):
                    sl = slice(i, i + TEACHER_ROWS)
                    tk, tv = teacher.empty_cache(X[sl].shape[0])
                    parts.append(teacher(X[sl], V[sl], Cc[sl], tk.to(dev), tv.to(dev))[0])
                target = torch.cat(parts)
            soft = -(target.exp() * F.log_softmax(logits, -1)).sum(-1)
            per_tok = (1 - args.distill_weight) * per_tok + args.distill_weight * soft
        w = (Y != -100).float()
        w[:, : args.start_tokens] *= args.start_weight
        loss = (per_tok * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        n_tok = int((Y != -100).sum())
        step += 1
        tokens_seen += n_tok
        tok_since += n_tok
        dt = time.time() - t0
        elapsed += dt
        pbar.update(int(elapsed) - pbar.n)
        run_loss = float(loss) if run_loss is None else 0.98 * run_loss + 0.02 * float(loss)
        pbar.set_postfix(loss=f"{run_loss:.3f}", lr=f"{lr:.2e}", step=step)
        if time.time() - t_log > 60 or step in (10, 50):
            tps = tok_since / (time.time() - t_since)
            log(f"step {step} train_loss {run_loss:.4f} lr {lr:.2e} tokens {tokens_seen} tok/s {tps:.0f} "
                f"trained {elapsed/60:.1f}/{args.budget_min:.0f} min")
            t_log, tok_since, t_since = time.time(), 0, time.time()
        if elapsed - last_eval > args.eval_every_min * 60:
            evaluate()
            last_eval = elapsed
    pbar.close()
    if stop:
        log(f"stopped by SIGTERM at {elapsed/60:.1f} of {args.budget_min:.1f} min")
    if args.no_final_eval:
        save("last.pt")
    else:
        evaluate()
    log(f"done: steps {step}, tokens {tokens_seen}, trained {elapsed/60:.1f} min, best valid {best:.4f}")
    json.dump(dict(history=history, steps=step, tokens=tokens_seen, train_minutes=round(elapsed / 60, 2),
                   best_valid_nll=best, final_train_loss_running=run_loss, tokens_per_s=tokens_seen / max(elapsed, 1e-9),
                   cfg=cfg, args=vars(args), parent=parent, machine=machine(dev, args.threads)),
              open(os.path.join(run, "summary.json"), "w"), indent=1)


def machine(dev, threads):
    """What the run's figures (tokens/s, minutes) were measured on, for the model card."""
    m = dict(device=dev.type, torch=torch.__version__, cpu=f"{platform.machine()}, {os.cpu_count()} cores",
             torch_threads=threads)
    if dev.type == "cuda":
        m["gpu"] = torch.cuda.get_device_name(dev)
        m["matmul"] = "TF32"
    return m


if __name__ == "__main__":
    main()
