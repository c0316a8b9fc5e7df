//! The model as a `NoteSource`: incremental decoding with the key/value cache, four tokens (S, A,
//! T, B) per grid step, sampled with temperature and nucleus (top-p) from the engine's seeded
//! RNG, inside each voice's range and optionally the scene's scale.
//!
//! With classifier-free guidance (weight w != 1) every token also goes through the model with the
//! all-unknown conditioning vector, which condition dropout trained as the unconditional model,
//! beside it (one buffer caches both; ONNX Runtime runs them as one batch of two, tract as two
//! passes), and the logits sampled from are `uncond + w * (cond - uncond)`: what the conditioning
//! asks for is heard more clearly.
//!
//! Decoding keeps one token "pending": the cache holds every token but the last, and the last is
//! fed, with the conditioning of the step being composed, to get the logits of the next. A
//! conditioning change therefore reaches the very first token of the next step. The cache is a
//! ring of context - 1 slots (`Cache::ring`): once full, each token overwrites the oldest, so
//! every token hears the context before it and no step moves the cache. Rollback keeps, per
//! step, the RNG state and how the cache was built, so a rolled-back step decodes exactly as a
//! fresh decode that took the same path would: taking tokens back is exact because earlier
//! slots never change and the ring keeps what the latest overwrites replaced (to float
//! rounding where the keys were turned back between, `Net::turn_back`); a rollback further
//! back, or across a re-prime, rebuilds the cache by replaying the same passes (a token a pass:
//! where heard steps went in as one pass, to float rounding), or, beyond that, by a fresh pass
//! over the context before the step.

use std::sync::Arc;

use super::card::Card;
use super::runtime::{Cache, Net, EVICTED_KEPT};
use super::{Model, ModelError};
use crate::control::Conditioning;
use crate::gen::history::History;
use crate::gen::{Heard, NoteSource, SamplingParams, SourceError, Step, VOICES};
use crate::music::{Mode, PitchSet};
use crate::rng::Rng;

/// What is needed to put a step back exactly as it was first decoded.
#[derive(Clone, Debug)]
struct Snapshot {
    rng: Rng,
    /// Absolute index of the first token fed into the cache since it was last emptied (a full
    /// ring holds only the last of them).
    cache_start: usize,
    /// Absolute index where the last re-priming pass ended (tokens from here on went through
    /// the model one at a time).
    prime_end: usize,
}

/// Conditioning turned into the model's vector by the card's layout and normalisation.
pub fn cond_vector(card: &Card, cond: &Conditioning) -> Vec<f32> {
    let c = &card.conditioning;
    let mut x = vec![0.0f32; c.dim];
    let norm = |v: f32, r: [f32; 2]| ((v - r[0]) / (r[1] - r[0])).clamp(0.0, 1.0);
    if let Some(d) = cond.density.filter(|d| d.is_finite()) {
        x[c.density.index] = norm(d, c.density.range);
        x[c.density.known_flag_index] = 1.0;
    }
    if let Some(r) = cond.register.filter(|r| r.is_finite()) {
        x[c.register.index] = norm(r, c.register.range);
        x[c.register.known_flag_index] = 1.0;
    }
    if let Some(m) = cond.major.filter(|m| m.is_finite()) {
        x[c.mode.index] = m.clamp(0.0, 1.0);
        x[c.mode.known_flag_index] = 1.0;
    }
    if let (Some(t), Some(k)) = (&c.tonic, cond.tonic) {
        x[t.indices[(k % 12) as usize]] = 1.0;
        x[t.known_flag_index] = 1.0;
    }
    if let (Some(key), Some(tonic), Some(m)) =
        (&c.key, cond.tonic, cond.major.filter(|m| m.is_finite()))
    {
        let m = m.clamp(0.0, 1.0);
        for (pc, &i) in key.indices.iter().enumerate() {
            let degree = (pc + 12 - (tonic % 12) as usize) % 12;
            x[i] = m * key.major[degree] + (1.0 - m) * key.minor[degree];
        }
    }
    // Unknown style names are ignored; weights that sum to nothing leave the style unknown,
    // which is exactly the all-zero slice the model was trained to read as "any style".
    for (name, w) in &cond.styles {
        if let Some(k) = c.style.order.iter().position(|s| s == name) {
            x[c.style.indices[k]] = w.clamp(0.0, 1.0);
        }
    }
    x
}

/// Samples a token from `logits` with temperature and nucleus sampling, after `allowed` masks.
/// Deterministic for a given RNG state: ties are broken by token id.
pub fn sample(logits: &[f32], allowed: &[bool], params: &SamplingParams, rng: &mut Rng) -> usize {
    let t = params.temperature.max(1e-3) as f64;
    let mut cand: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(i, x)| allowed[*i] && x.is_finite())
        .map(|(i, &x)| (i, x as f64 / t))
        .collect();
    if cand.is_empty() {
        // Cannot happen with silence always allowed; keep the caller safe anyway.
        return allowed.iter().position(|a| *a).unwrap_or(0);
    }
    let max = cand.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
    let mut total = 0.0;
    for c in cand.iter_mut() {
        c.1 = (c.1 - max).exp();
        total += c.1;
    }
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let top_p = (params.top_p as f64).clamp(0.0, 1.0);
    let mut kept = 0;
    let mut cum = 0.0;
    for c in &cand {
        kept += 1;
        cum += c.1 / total;
        if cum >= top_p {
            break;
        }
    }
    cand.truncate(kept);
    let mass: f64 = cand.iter().map(|c| c.1).sum();
    let mut x = rng.next_f64() * mass;
    for c in &cand {
        if x < c.1 {
            return c.0;
        }
        x -= c.1;
    }
    cand.last().map(|c| c.0).unwrap_or(0)
}

/// The cache decoding runs on: of the conditioned sequence alone or, under guidance, of it and
/// the unconditional one beside it, decoded together (see `Net::forward_streams`). Both always
/// hold the same tokens at the same positions, so every cut and snapshot applies to both.
#[derive(Clone, Debug)]
struct Caches {
    both: Cache,
}

impl Caches {
    fn empty() -> Self {
        Caches {
            both: Cache::empty(),
        }
    }

    /// Tokens it took in since it was last emptied (a full ring holds the last of them).
    fn len(&self) -> usize {
        self.both.added()
    }

    /// Whether it holds guidance's pair (its number of sequences, set when it was given room).
    fn guided(&self) -> bool {
        self.both.streams() == Self::streams(true)
    }

    fn streams(guided: bool) -> usize {
        if guided {
            2
        } else {
            1
        }
    }

    /// Empties it for decoding guided or not, as a ring of `slots`, keeping its buffers where
    /// they are of that shape.
    fn reset(&mut self, guided: bool, net: &Net, slots: usize) {
        let streams = Self::streams(guided);
        if self.both.is_ring() && self.both.streams() == streams && self.both.capacity() == slots {
            self.both.clear();
        } else {
            self.both = Cache::ring(net, streams, slots);
        }
    }

    /// Runs `tokens` through the model after the cache: with `cond` and, under guidance, with
    /// `unknown` (one token's all-unknown vector) beside it. Returns the conditioned logits and
    /// the unconditional ones.
    fn forward(
        &mut self,
        net: &mut Net,
        (tokens, voices, cond): (&[i64], &[i64], &[f32]),
        unknown: &[f32],
    ) -> Result<(Vec<f32>, Option<Vec<f32>>), ModelError> {
        if !self.guided() {
            return Ok((net.forward(tokens, voices, cond, &mut self.both)?, None));
        }
        // One vector per token; a single token (every decoding step) needs no copy.
        let repeated;
        let unknown = match tokens.len() {
            1 => unknown,
            n => {
                repeated = unknown.repeat(n);
                &repeated
            }
        };
        let mut logits = net.forward_streams(tokens, voices, &[cond, unknown], &mut self.both)?;
        let plain = logits.split_off(logits.len() / 2);
        Ok((logits, Some(plain)))
    }
}

/// `uncond + w * (cond - uncond)`, in place in `cond`.
fn guide(cond: &mut [f32], uncond: &[f32], w: f32) {
    for (c, &u) in cond.iter_mut().zip(uncond) {
        *c = u + w * (*c - u);
    }
}

/// Tokens heard (played by another source) that a full ring takes one pass each; more are
/// heard through one fresh pass over the context before the next token.
const HEARD_ONE_BY_ONE: usize = 64;

pub struct ModelSource {
    net: Net,
    card: Card,
    tonic: u8,
    scale_lock: bool,
    /// Steps a voice may repeat its token (hold a note or rest) before it must change; 0 = any.
    max_hold: usize,
    /// Classifier-free guidance weight: 1 = the conditioned model alone, 0 = unconditional.
    guidance: f32,
    /// The all-unknown conditioning vector, for the unconditional pass.
    unknown: Vec<f32>,
    /// The mode the scale mask uses when the conditioning leaves the mode unknown.
    scene_mode: Mode,
    seed: u64,
    rng: Rng,
    /// Tokens from absolute index `base` on, with the voice id and conditioning each was fed
    /// with (the pending last token has no conditioning yet).
    tokens: Vec<i64>,
    voices: Vec<i64>,
    conds: Vec<f32>,
    base: usize,
    cache: Caches,
    cache_start: usize,
    prime_end: usize,
    /// The step the first token after BOS belongs to.
    start_step: u64,
    position: u64,
    history: History<Snapshot>,
    /// Which tokens each voice may take (range), before the scale mask.
    range_mask: [Vec<bool>; VOICES],
}

impl ModelSource {
    pub fn new(model: Model, tonic: u8, scale_lock: bool, scene_mode: Mode, seed: u64) -> Self {
        let card = model.card;
        let range_mask = std::array::from_fn(|v| {
            let (lo, hi) = card.voice_range(v);
            (0..card.vocabulary.size as i64)
                .map(|tok| {
                    tok == card.vocabulary.silence
                        || card
                            .token_pitch(tok)
                            .is_some_and(|p| (lo..=hi).contains(&p))
                })
                .collect()
        });
        let cond_dim = card.conditioning.dim;
        let mut s = ModelSource {
            net: model.net,
            card,
            tonic,
            scale_lock,
            max_hold: 0,
            guidance: 1.0,
            unknown: vec![0.0; cond_dim],
            scene_mode,
            seed,
            rng: Rng::new(seed),
            tokens: Vec::new(),
            voices: Vec::new(),
            conds: Vec::new(),
            base: 0,
            cache: Caches::empty(),
            cache_start: 0,
            prime_end: 0,
            start_step: 0,
            position: 0,
            history: History::default(),
            range_mask,
        };
        s.start_at(0);
        s
    }

    /// Limits how many steps a voice may hold a note or a rest (0 = no limit).
    pub fn with_max_hold(mut self, steps: usize) -> Self {
        self.max_hold = steps;
        self
    }

    /// Steers with classifier-free guidance at weight `w` (1 = off: one pass per token). Starts
    /// the composition again, since the unconditional cache must hold every token.
    pub fn with_guidance(mut self, w: f32) -> Self {
        self.guidance = if w.is_finite() { w.max(0.0) } else { 1.0 };
        self.start_at(self.start_step);
        self
    }

    fn guided(&self) -> bool {
        self.guidance != 1.0
    }

    /// How many steps in a row `voice` has had the token it has now (0 before its first).
    fn held_steps(&self, voice: usize) -> usize {
        // Tokens of voice v sit at step_index(s) + v; walk back while they repeat.
        let at = |i: usize| self.tokens.get(i.checked_sub(self.base)?).copied();
        let first = self.step_index(self.start_step) + voice;
        let Some(mut i) = self.end().checked_sub(VOICES).filter(|&i| i >= first) else {
            return 0;
        };
        let now = at(i);
        let mut n = 1;
        while i >= first + VOICES && i - VOICES >= self.base && at(i - VOICES) == now {
            i -= VOICES;
            n += 1;
        }
        n
    }

    /// How many times the cache's keys were turned back, to keep the positions within the
    /// graph's rotation tables (`Net::turn_back`).
    pub fn turned(&self) -> usize {
        self.cache.both.turned()
    }

    /// Tokens it keeps (with their voices and conditioning) for rollbacks and holds: a
    /// months-long run keeps a few thousand.
    pub fn tokens_kept(&self) -> usize {
        self.tokens.len()
    }

    /// Slots of the cache's ring: every token hears this many before it.
    fn slots(&self) -> usize {
        self.card.context_length - 1
    }

    pub fn card(&self) -> &Card {
        &self.card
    }

    fn fail(&self, e: ModelError) -> SourceError {
        SourceError::Failed {
            source_name: "model".into(),
            message: e.to_string(),
        }
    }

    /// Absolute index one past the last token.
    fn end(&self) -> usize {
        self.base + self.tokens.len()
    }

    /// Absolute index of the first token of `step` (after BOS).
    fn step_index(&self, step: u64) -> usize {
        1 + VOICES * (step - self.start_step) as usize
    }

    fn slice(&self, from: usize, to: usize) -> (&[i64], &[i64], &[f32]) {
        let (a, b) = (from - self.base, to - self.base);
        let d = self.card.conditioning.dim;
        (
            &self.tokens[a..b],
            &self.voices[a..b],
            &self.conds[a * d..b * d],
        )
    }

    /// One fresh pass over tokens [from, to) (already fed once, so their conditioning is known).
    fn prime(&mut self, from: usize, to: usize) -> Result<(), ModelError> {
        // The caches keep their room. A failed pass leaves them empty, never half-written: a
        // pass counts its tokens in only once all of it has run.
        self.cache.both.clear();
        self.cache_start = from;
        self.prime_end = from;
        self.feed(from, to)?;
        self.prime_end = to;
        Ok(())
    }

    /// One fresh pass over the ring's worth of tokens before `to` (as many as are kept).
    fn prime_context_before(&mut self, to: usize) -> Result<(), ModelError> {
        self.prime(to.saturating_sub(self.slots()).max(self.base), to)
    }

    /// Adds tokens [from, to) (their conditioning known) to the cache in one pass.
    fn feed(&mut self, from: usize, to: usize) -> Result<(), ModelError> {
        if to > from {
            let (t, v, c) = self.slice(from, to);
            let (t, v, c) = (t.to_vec(), v.to_vec(), c.to_vec());
            self.cache
                .forward(&mut self.net, (&t, &v, &c), &self.unknown)?;
        }
        Ok(())
    }

    /// Feeds the pending token with `cond` and returns the logits that follow it (guided, if
    /// guidance is on).
    fn feed_pending(&mut self, cond: &[f32]) -> Result<Vec<f32>, ModelError> {
        let last = self.end() - 1;
        debug_assert_eq!(self.cache_start + self.cache.len(), last);
        let d = self.card.conditioning.dim;
        self.conds.truncate((last - self.base) * d);
        self.conds.extend_from_slice(cond);
        let (t, v) = (self.tokens[last - self.base], self.voices[last - self.base]);
        let (mut logits, plain) =
            self.cache
                .forward(&mut self.net, (&[t], &[v], cond), &self.unknown)?;
        if let Some(plain) = plain {
            guide(&mut logits, &plain, self.guidance);
        }
        Ok(logits)
    }

    fn allowed(&self, voice: usize, cond: &Conditioning) -> Vec<bool> {
        let mut allowed = self.range_mask[voice].clone();
        if self.scale_lock {
            let mode = cond
                .major
                .map(Mode::from_major_weight)
                .unwrap_or(self.scene_mode);
            let scale = PitchSet::scale(self.tonic, mode);
            for (tok, a) in allowed.iter_mut().enumerate() {
                if let Some(p) = self.card.token_pitch(tok as i64) {
                    *a &= scale.contains(p);
                }
            }
        }
        allowed
    }

    fn decode_step(
        &mut self,
        cond: &Conditioning,
        params: &SamplingParams,
    ) -> Result<Step, ModelError> {
        let vec = cond_vector(&self.card, cond);
        let mut step: Step = [None; VOICES];
        for (voice, slot) in step.iter_mut().enumerate() {
            let logits = self.feed_pending(&vec)?;
            let mut allowed = self.allowed(voice, cond);
            if self.max_hold > 0 && self.held_steps(voice) >= self.max_hold {
                let last = self.tokens[self.end() - VOICES - self.base] as usize;
                // Only if something else is left to sing.
                if allowed.iter().enumerate().any(|(t, &a)| a && t != last) {
                    allowed[last] = false;
                }
            }
            let tok = sample(&logits, &allowed, params, &mut self.rng) as i64;
            self.tokens.push(tok);
            self.voices.push(voice as i64);
            *slot = self.card.token_pitch(tok);
        }
        Ok(step)
    }

    fn hear_steps(&mut self, heard: &[Heard]) -> Result<(), ModelError> {
        let before = (self.tokens.len(), self.conds.len(), self.position);
        let mut vec: Option<(&Arc<Conditioning>, Vec<f32>)> = None;
        for h in heard {
            // The control loop smooths, so the conditioning may move every step, or hold for
            // many: its vector is worked out once for each run of steps that share it.
            if !vec.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, &h.cond)) {
                vec = Some((&h.cond, cond_vector(&self.card, &h.cond)));
            }
            let (_, row) = vec.as_ref().expect("set above");
            for (voice, &t) in h.step.iter().enumerate() {
                // The token before takes its conditioning as the next is appended, as decoding
                // leaves it: every token but the pending last one has one.
                self.conds.extend_from_slice(row);
                self.tokens.push(self.heard_token(t));
                self.voices.push(voice as i64);
            }
        }
        self.position += heard.len() as u64;
        // Snapshots are of the decoding state alone; the steps heard were never decoded.
        self.history.clear();
        let (cached, to) = (self.cache_start + self.cache.len(), self.end() - 1);
        let room = self.slots() - self.cache.both.len();
        if to - cached > room.max(HEARD_ONE_BY_ONE) {
            // More than the ring has room for, and too many for a pass each: one fresh pass over
            // the context before the next token.
            return self.prime_context_before(to);
        }
        self.feed(cached, to).inspect_err(|_| {
            // The cache stands as it was: so do the tokens it was to take in.
            let (tokens, conds, position) = before;
            self.tokens.truncate(tokens);
            self.voices.truncate(tokens);
            self.conds.truncate(conds);
            self.position = position;
        })
    }

    /// The token for a pitch another source played: a pitch outside the vocabulary is heard an
    /// octave or more in, or as a rest if no octave of it fits.
    fn heard_token(&self, t: crate::gen::Token) -> i64 {
        let v = &self.card.vocabulary;
        let folded = t.and_then(|p| {
            let mut p = i32::from(p);
            while p < i32::from(v.pitch_min) {
                p += 12;
            }
            while p > i32::from(v.pitch_max) {
                p -= 12;
            }
            u8::try_from(p).ok()
        });
        folded
            .and_then(|p| self.card.pitch_token(p))
            .unwrap_or(v.silence)
    }

    /// Drops tokens no rollback can reach any more, so a months-long run stays small. A rollback
    /// to the oldest step kept reads at most the context before that step, or replays passes
    /// from a prime at most `EVICTED_KEPT` tokens before it (see `rollback`); a voice's hold
    /// looks back `max_hold` steps.
    fn compact(&mut self) {
        // A step that failed left its snapshot: saturate rather than trust the count.
        let oldest_step =
            (self.position.saturating_sub(self.history.len() as u64)).max(self.start_step);
        let cached_to = self.step_index(oldest_step) - 1;
        let held = cached_to.saturating_sub(VOICES * (self.max_hold + 1));
        let oldest = cached_to
            .saturating_sub(self.slots() + EVICTED_KEPT)
            .min(held)
            .max(self.base);
        let drop = oldest - self.base;
        if drop >= 4096 {
            let d = self.card.conditioning.dim;
            self.tokens.drain(..drop);
            self.voices.drain(..drop);
            self.conds.drain(..drop * d);
            self.base += drop;
        }
    }
}

impl NoteSource for ModelSource {
    fn name(&self) -> &str {
        "model"
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn next_step(
        &mut self,
        cond: &Conditioning,
        params: &SamplingParams,
    ) -> Result<Step, SourceError> {
        self.history.push(Snapshot {
            rng: self.rng.clone(),
            cache_start: self.cache_start,
            prime_end: self.prime_end,
        });
        let step = self.decode_step(cond, params).map_err(|e| self.fail(e))?;
        self.position += 1;
        self.compact();
        Ok(step)
    }

    fn rollback(&mut self, step: u64) -> Result<(), SourceError> {
        if step >= self.position {
            return Ok(());
        }
        let back = (self.position - step) as usize;
        let kept = self.history.len();
        let Some(snap) = (step >= self.start_step)
            .then(|| self.history.back(back))
            .flatten()
        else {
            return Err(SourceError::Failed {
                source_name: "model".into(),
                message: format!("cannot roll back to step {step}: only {kept} steps of history"),
            });
        };
        let keep = self.step_index(step);
        let d = self.card.conditioning.dim;
        self.tokens.truncate(keep - self.base);
        self.voices.truncate(keep - self.base);
        // The pending token's conditioning is given anew when it is fed again.
        self.conds.truncate((keep - 1 - self.base) * d);
        self.rng = snap.rng;
        let cached_to = keep - 1;
        let same_passes = snap.cache_start == self.cache_start && snap.prime_end == self.prime_end;
        if same_passes
            && self
                .net
                .truncate(&mut self.cache.both, cached_to - self.cache_start)
        {
            // Taken back in place: the slots it filled are free or hold again what they held.
        } else if cached_to.saturating_sub(snap.prime_end) <= EVICTED_KEPT
            && snap.cache_start >= self.base
        {
            // A re-prime since, or overwrites no longer kept: rebuild the cache by the same
            // passes that built it.
            let rebuild = |s: &mut Self| -> Result<(), ModelError> {
                s.prime(snap.cache_start, snap.prime_end)?;
                for i in snap.prime_end..cached_to {
                    s.feed(i, i + 1)?;
                }
                Ok(())
            };
            rebuild(self).map_err(|e| self.fail(e))?;
        } else {
            // Further back than that reaches: a fresh pass over the context before the step
            // hears the same window, if not with exactly the keys it had.
            // `compact` keeps at least this much before any step a rollback can reach.
            debug_assert!(
                cached_to.saturating_sub(self.slots()) >= self.base,
                "compact dropped tokens a rollback reads"
            );
            self.prime_context_before(cached_to)
                .map_err(|e| self.fail(e))?;
        }
        self.position = step;
        Ok(())
    }

    fn hear(&mut self, heard: &[Heard]) -> Result<(), SourceError> {
        self.hear_steps(heard).map_err(|e| self.fail(e))
    }

    fn start_at(&mut self, step: u64) {
        let c = &self.card;
        self.tokens = vec![c.vocabulary.bos];
        self.voices = vec![c.voices.start_id];
        self.conds.clear();
        self.base = 0;
        let guided = self.guided();
        let slots = self.slots();
        self.cache.reset(guided, &self.net, slots);
        self.cache_start = 0;
        self.prime_end = 0;
        self.start_step = step;
        self.position = step;
        self.history.clear();
        // Each composition gets its own stream, the same for the same seed and start.
        self.rng = Rng::new(self.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
}
