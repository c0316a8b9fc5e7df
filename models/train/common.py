"""Shared definitions for roomscore's training pipeline: vocabulary, voices, styles and the
conditioning features. Everything here is also written into the model card so the Rust engine
never hard-codes it; keep the two in step (export.py builds the card from these constants)."""
import math

import numpy as np

# ---------------------------------------------------------------- vocabulary
SILENCE = 0  # token id of "this voice is silent on this step"
BOS = 1  # start-of-piece token, fed once with voice id VOICE_START
PITCH_LO = 24  # MIDI pitch of token id PITCH_OFFSET (C1)
PITCH_HI = 108  # highest representable MIDI pitch (C8)
PITCH_OFFSET = 2  # token id = PITCH_OFFSET + (midi - PITCH_LO)
VOCAB_SIZE = PITCH_OFFSET + (PITCH_HI - PITCH_LO + 1)  # 87

VOICES = ["soprano", "alto", "tenor", "bass"]
VOICE_START = 4  # voice id that goes with BOS
N_VOICE_IDS = 5

STYLES = ["chorale", "quartet", "palestrina", "folk"]

STEPS_PER_BEAT = 4  # a beat is a quarter note = four 16th steps

# ---------------------------------------------------------------- conditioning
# Raw features per step (computed by features()), over windows clipped to the piece:
#   density  = onsets (all four voices) in steps [t-16, t+16) / (window steps / 4)   [onsets per beat]
#   register = mean MIDI pitch over all sounding (voice, step) cells in steps [t-16, t+16)
#   mode     = 1 major / 0 minor: Krumhansl-Schmuckler over steps [t-32, t+32), duration-weighted
#   tonic    = the pitch class (0 = C .. 11 = B) of the key Krumhansl-Schmuckler picks over that window
# An onset is a sounding cell whose pitch differs from the same voice's previous step (or t = 0).
DENSITY_HALF = 16
MODE_HALF = 32
# Normalisation of the raw units to [0, 1] (clipped):
DENSITY_RANGE = (0.0, 8.0)  # onsets per beat
REGISTER_RANGE = (48.0, 80.0)  # MIDI pitch

PITCH_CLASSES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
TONIC_INDEX = 10  # first of the 12 tonic columns; TONIC_INDEX + 12 is tonic_known
KEY_INDEX = 23  # first of the 12 key-profile columns (pitch classes C..B)

# Conditioning vector fed beside every token, float32, in this order:
COND_NAMES = [
    "density",  # (density - 0) / 8 clipped to [0,1]
    "density_known",  # 1 if density given, else 0 (and density = 0)
    "register",  # (register - 48) / 32 clipped to [0,1]
    "register_known",
    "mode",  # 1 major, 0 minor
    "mode_known",
    "style_chorale",  # style weights; all zero = unknown style
    "style_quartet",
    "style_palestrina",
    "style_folk",
    # the key's tonic, one-hot by pitch class (C, C#, ..., B), moved with the transposition; with
    # mode it names the key, which mode alone leaves to the context (the first model ignored it)
    *[f"tonic_{pc}" for pc in PITCH_CLASSES],
    "tonic_known",
    # the key as a pitch-class profile: the Krumhansl-Schmuckler profile of the mode, rotated to
    # the tonic and scaled to [0, 1]; zero unless tonic and mode are both known. It says what
    # tonic x mode means pitch by pitch (A minor stresses C, A major C#), which a linear read of
    # the one-hot tonic and the mode bit cannot: the second model all but ignored the mode bit
    *[f"key_{pc}" for pc in PITCH_CLASSES],
]
COND_DIM = len(COND_NAMES)

KS_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KS_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def _unit(prof):
    return (prof - prof.min()) / (prof.max() - prof.min())


# Key-profile columns: KEY_MAJOR[(pc - tonic) % 12] for a major key, KEY_MINOR for a minor one, a
# mode weight m in between gives m * major + (1 - m) * minor (the engine may glide the mode).
KEY_MAJOR = _unit(KS_MAJOR)
KEY_MINOR = _unit(KS_MINOR)


def key_profile(mode, tonic):
    """mode weight (1 major .. 0 minor) and tonic pitch class, scalars or arrays of one length ->
    the 12 key-profile columns ([12], or [n, 12])."""
    m = np.asarray(mode, np.float64)[..., None]
    rot = (np.arange(12) - np.asarray(tonic, np.int64)[..., None]) % 12  # degree of each pitch class
    return (m * KEY_MAJOR[rot] + (1.0 - m) * KEY_MINOR[rot]).astype(np.float32)


def refresh_key(c):
    """Zero the key-profile columns of the rows of c [steps, COND_DIM] whose mode or tonic is
    unknown (after condition dropout): the profile is only known when both are."""
    unknown = (c[:, 5] == 0) | (c[:, TONIC_INDEX + 12] == 0)
    c[unknown, KEY_INDEX : KEY_INDEX + 12] = 0.0
    return c


def midi_to_token(p):
    return PITCH_OFFSET + (p - PITCH_LO)


def grid_to_tokens(grid):
    """grid: int array [steps, 4] of MIDI pitches, -1 = silence -> token ids (same shape)."""
    g = np.asarray(grid)
    return np.where(g < 0, SILENCE, g - PITCH_LO + PITCH_OFFSET).astype(np.int16)


def tokens_to_pitch(tok):
    t = np.asarray(tok).astype(np.int64)
    return np.where(t >= PITCH_OFFSET, t - PITCH_OFFSET + PITCH_LO, -1)


def _ks_key(hist):
    """hist [12] duration-weighted pitch-class histogram -> (mode, tonic): mode 1 major, 0 minor,
    tonic 0..11 (C..B); (-1, -1) if unknown. Ties go to major, then to the lower tonic."""
    if hist.sum() <= 0 or hist.std() == 0:
        return -1, -1
    best_maj, maj_k = -2.0, 0
    best_min, min_k = -2.0, 0
    h = hist - hist.mean()
    hn = math.sqrt((h * h).sum())
    for k in range(12):
        for prof, is_major in ((KS_MAJOR, True), (KS_MINOR, False)):
            p = np.roll(prof, k)  # p[pc] = prof[(pc - k) % 12]
            pc_ = p - p.mean()
            r = float((h * pc_).sum() / (hn * math.sqrt((pc_ * pc_).sum())))
            if is_major:
                if r > best_maj:
                    best_maj, maj_k = r, k
            elif r > best_min:
                best_min, min_k = r, k
    return (1, maj_k) if best_maj >= best_min else (0, min_k)


def features(pitch_grid):
    """Raw conditioning features per step for one piece.

    pitch_grid: int [steps, 4] MIDI pitches, -1 silence.
    Returns density float32 [steps] (onsets/beat), register float32 [steps] (MIDI; NaN if nothing
    sounds in the window), mode int8 [steps] (1 major, 0 minor, -1 unknown), tonic int8 [steps]
    (pitch class 0..11 of the key, -1 unknown)."""
    g = np.asarray(pitch_grid).astype(np.int64)
    n = g.shape[0]
    sounding = g >= 0
    prev = np.vstack([np.full((1, 4), -2), g[:-1]])
    onset = sounding & (g != prev)
    on_c = np.concatenate([[0], np.cumsum(onset.sum(1))])
    snd_c = np.concatenate([[0], np.cumsum(sounding.sum(1))])
    psum_c = np.concatenate([[0], np.cumsum(np.where(sounding, g, 0).sum(1))])
    pc_counts = np.zeros((n, 12))
    for v in range(4):
        m = sounding[:, v]
        pc_counts[np.nonzero(m)[0], g[m, v] % 12] += 1
    pc_c = np.vstack([np.zeros((1, 12)), np.cumsum(pc_counts, 0)])
    density = np.zeros(n, np.float32)
    register = np.full(n, np.nan, np.float32)
    mode = np.full(n, -1, np.int8)
    tonic = np.full(n, -1, np.int8)
    mode_cache = {}
    for t in range(n):
        a, b = max(0, t - DENSITY_HALF), min(n, t + DENSITY_HALF)
        density[t] = (on_c[b] - on_c[a]) / ((b - a) / STEPS_PER_BEAT)
        cnt = snd_c[b] - snd_c[a]
        if cnt > 0:
            register[t] = (psum_c[b] - psum_c[a]) / cnt
        a, b = max(0, t - MODE_HALF), min(n, t + MODE_HALF)
        h = pc_c[b] - pc_c[a]
        key = h.tobytes()
        if key not in mode_cache:
            mode_cache[key] = _ks_key(h)
        mode[t], tonic[t] = mode_cache[key]
    return density, register, mode, tonic


def cond_vector(density=None, register=None, mode=None, style=None, tonic=None):
    """Raw values (None = unknown) -> the model's conditioning vector (list of COND_DIM floats).
    style: a style name, or a dict {name: weight}, or None. tonic: pitch class 0..11."""
    c = [0.0] * COND_DIM
    if density is not None and not (isinstance(density, float) and math.isnan(density)):
        lo, hi = DENSITY_RANGE
        c[0] = min(1.0, max(0.0, (density - lo) / (hi - lo)))
        c[1] = 1.0
    if register is not None and not (isinstance(register, float) and math.isnan(register)):
        lo, hi = REGISTER_RANGE
        c[2] = min(1.0, max(0.0, (register - lo) / (hi - lo)))
        c[3] = 1.0
    if mode is not None and mode >= 0:
        c[4] = float(mode)
        c[5] = 1.0
    if style is not None:
        if isinstance(style, str):
            style = {style: 1.0}
        for k, w in style.items():
            c[6 + STYLES.index(k)] = float(w)
    if tonic is not None and tonic >= 0:
        c[TONIC_INDEX + int(tonic) % 12] = 1.0
        c[TONIC_INDEX + 12] = 1.0
        if mode is not None and mode >= 0:
            c[KEY_INDEX : KEY_INDEX + 12] = key_profile(float(mode), tonic).tolist()
    return c


def cond_arrays(density, register, mode, style_idx, shift=0, tonic=None):
    """Vectorised cond_vector over steps: -> float32 [steps, COND_DIM]. register and tonic shifted
    by `shift` semitones (transposition). style_idx: int or None; tonic None = unknown throughout."""
    n = len(density)
    c = np.zeros((n, COND_DIM), np.float32)
    lo, hi = DENSITY_RANGE
    c[:, 0] = np.clip((density - lo) / (hi - lo), 0, 1)
    c[:, 1] = 1.0
    reg = register + shift
    known = ~np.isnan(reg)
    lo, hi = REGISTER_RANGE
    c[:, 2] = np.where(known, np.clip((np.nan_to_num(reg) - lo) / (hi - lo), 0, 1), 0)
    c[:, 3] = known
    mk = mode >= 0
    c[:, 4] = np.where(mk, mode, 0)
    c[:, 5] = mk
    if style_idx is not None:
        c[:, 6 + style_idx] = 1.0
    if tonic is not None:
        tk = np.nonzero(tonic >= 0)[0]
        c[tk, TONIC_INDEX + (tonic[tk].astype(np.int64) + shift) % 12] = 1.0
        c[tk, TONIC_INDEX + 12] = 1.0
        both = np.nonzero((tonic >= 0) & mk)[0]
        c[both, KEY_INDEX : KEY_INDEX + 12] = key_profile(mode[both], tonic[both].astype(np.int64) + shift)
    return c


def eval_cond():
    """Conditioning used for the JSB benchmark: everything unknown, style = chorale."""
    return np.array(cond_vector(style="chorale"), np.float32)


# ---------------------------------------------------------------- sequences and eval windows
def piece_sequence(tok_grid):
    """tok_grid int [steps, 4] token ids -> (tokens [1+4*steps], voices, step index) with BOS first.
    The BOS position uses step 0's conditioning."""
    steps = tok_grid.shape[0]
    tokens = np.concatenate([[BOS], np.asarray(tok_grid, np.int64).reshape(-1)])
    voices = np.concatenate([[VOICE_START], np.tile(np.arange(4), steps)])
    step = np.concatenate([[0], np.repeat(np.arange(steps), 4)])
    return tokens.astype(np.int64), voices.astype(np.int64), step.astype(np.int64)


def eval_windows(L, ctx):
    """Windowing protocol for scoring a sequence of length L (BOS + 4*steps tokens) with a model of
    context ctx. Returns [(start, end, first_scored)]: run tokens[start:end] as a fresh full pass
    (P = 0, positions 0..end-start-1); the logits at window position i predict sequence position
    start+i+1; score the targets j in [first_scored, end) (j >= 1). Windows start at 0, ctx/2, ctx,
    ... while start + ctx < L, plus a last window [max(0, L-ctx), L); each target is scored once, by
    the first window that contains it, so every target after the first window has >= ctx/2 tokens
    of context."""
    stride = ctx // 2
    if L <= ctx:
        return [(0, L, 1)]
    out = []
    scored = 1  # next target to score
    s = 0
    while s + ctx < L:
        out.append((s, s + ctx, scored))
        scored = s + ctx
        s += stride
    last = L - ctx
    out.append((last, L, scored))
    return out


# ---------------------------------------------------------------- transposition mixture
def transpose_mix_tables(shifts):
    """The constants of model.TransposeMix for these shifts (semitones), as numpy arrays:
    tok_map [K, V] (a pitch token moved by k, clamped to the vocabulary; silence and BOS stay),
    back [K, V, V] and back_mask [K, 1, V] (original token j reads the moved distribution at j+k;
    where j+k leaves the vocabulary, j gets -1e9), cond_mats [K, C, C] (row vector @ matrix moves
    the conditioning: register up by k semitones where known, tonic and key profile rotated by k)
    and cond_lo/cond_hi [C] (the register clipped to [0, 1] again, as cond_vector clips it)."""
    K, V = len(shifts), VOCAB_SIZE
    tok_map = np.tile(np.arange(V, dtype=np.int64), (K, 1))
    back = np.zeros((K, V, V), np.float32)
    back_mask = np.zeros((K, 1, V), np.float32)
    cond_mats = np.zeros((K, COND_DIM, COND_DIM), np.float32)
    for i, k in enumerate(shifts):
        for j in range(V):
            if j < PITCH_OFFSET:
                back[i, j, j] = 1.0
                continue
            tok_map[i, j] = min(V - 1, max(PITCH_OFFSET, j + k))
            if PITCH_OFFSET <= j + k < V:
                back[i, j + k, j] = 1.0
            else:
                back_mask[i, 0, j] = -1e9
        m = np.eye(COND_DIM, dtype=np.float32)
        m[3, 2] = k / (REGISTER_RANGE[1] - REGISTER_RANGE[0])  # register += k/32 where register_known
        for base in (TONIC_INDEX, KEY_INDEX):
            m[base : base + 12, base : base + 12] = 0.0
            for pc in range(12):
                m[base + pc, base + (pc + k) % 12] = 1.0
        cond_mats[i] = m
    cond_lo = np.full(COND_DIM, -1e9, np.float32)  # finite: no infinities in the graph
    cond_hi = np.full(COND_DIM, 1e9, np.float32)
    cond_lo[2], cond_hi[2] = 0.0, 1.0
    return tok_map, back, back_mask, cond_mats, cond_lo, cond_hi
