//! Steps to note events, ahead of the playhead. Steps are committed (turned into events for the
//! audio thread) only when the playhead comes within the lookahead; a source may decode further
//! ahead, and those uncommitted steps are thrown away and decoded again when the conditioning
//! changes, so that a change is heard within one step of the lookahead.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pace::{self, Backoff, Behind, Pace};
use super::rules::RuleSource;
use super::{
    Heard, NoteEvent, NoteSource, SamplingParams, SourceError, Step, STEPS_PER_BEAT, VOICES,
};
use crate::control::Conditioning;

/// Steps kept of what the room heard, for a source taken back to carry on from: 16 beats, half
/// the context the shipped model hears.
const HEARD_KEPT: usize = 64;
/// Steps a source being taken back hears before each step committed: about one step's work for
/// the shipped model (4 steps heard in one pass took 0.34-0.75 of a decoded step), and it
/// catches up with 64 in about 22 steps.
const HEAR_CHUNK: usize = 4;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GeneratorStats {
    pub steps: u64,
    pub rollbacks: u64,
    pub fallbacks: u64,
    pub notes: u64,
    /// Events that found the queue to the audio thread full and had to wait.
    pub queue_full: u64,
    /// Steps committed too late to sound (the generator fell behind the playhead).
    pub late_steps: u64,
    /// Sources set aside for not keeping up and taken back once they would.
    pub restores: u64,
}

/// A source given up for not keeping up, kept to be taken back when it would keep up again.
struct Parked {
    source: Box<dyn NoteSource>,
    median: Duration,
    since: Instant,
    /// Steps timed since the wait ran out, and the fastest of them.
    timed: u32,
    fastest: Duration,
    /// Once it fits again: since when, and from which step, it has been hearing the music to
    /// catch up with it.
    hearing: Option<(Instant, u64)>,
}

/// Runs `call` on `source`, a panic in it taken as the source failing: a bug in a composer must
/// cost the room its composer, not its music, and the generator falls back as for any error. The
/// source is dropped afterwards, so whatever state the panic left it in is never read.
fn guarded<T>(
    source: &mut dyn NoteSource,
    call: impl FnOnce(&mut dyn NoteSource) -> Result<T, SourceError>,
) -> Result<T, SourceError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| call(&mut *source))).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(SourceError::Failed {
            source_name: source.name().into(),
            message: format!("it panicked: {what}"),
        })
    })
}

/// `NoteSource::start_at` under `guarded`.
fn start_guarded(source: &mut dyn NoteSource, step: u64) -> Result<(), SourceError> {
    guarded(source, |s| {
        s.start_at(step);
        Ok(())
    })
}

/// Where timing a parked source's steps has got to.
enum Retimed {
    Failed(SourceError),
    /// Fewer than `pace::RETIMED_STEPS` timed, none fast enough yet.
    Timing,
    /// None of them fast enough: it waits again.
    TooSlow,
    Fits,
}

impl Parked {
    /// Times one more step, unless its step when it was given up fits at `bpm` already.
    fn retime(&mut self, cond: &Conditioning, params: &SamplingParams, bpm: f64) -> Retimed {
        if pace::fits(self.median, bpm) {
            return Retimed::Fits;
        }
        let t = Instant::now();
        if let Err(e) = guarded(self.source.as_mut(), |s| s.next_step(cond, params)) {
            return Retimed::Failed(e);
        }
        self.fastest = self.fastest.min(t.elapsed());
        self.timed += 1;
        if pace::fits(self.fastest, bpm) {
            self.median = self.fastest;
            Retimed::Fits
        } else if self.timed < pace::RETIMED_STEPS {
            Retimed::Timing
        } else {
            Retimed::TooSlow
        }
    }

    fn wait_again(&mut self) {
        (self.since, self.timed, self.fastest) = (Instant::now(), 0, Duration::MAX);
    }

    /// Hears the next few of `heard`, the ring whose first step is `first_kept`, from where the
    /// source stands. The ring drops at most one step a commit and the source hears four, so
    /// what it has yet to hear is still there.
    fn hear_next(&mut self, heard: &[Heard], first_kept: u64) -> Result<(), String> {
        let from = self
            .source
            .position()
            .checked_sub(first_kept)
            .ok_or("it fell behind what it was to hear")? as usize;
        let to = (from + HEAR_CHUNK).min(heard.len());
        let chunk = heard
            .get(from..to)
            .ok_or("it stood past what the room heard")?;
        guarded(self.source.as_mut(), |s| s.hear(chunk)).map_err(|e| e.to_string())?;
        let expected = first_kept + to as u64;
        match self.source.position() {
            p if p == expected => Ok(()),
            p => Err(format!(
                "it heard {} steps but moved on to step {p}, not {expected}",
                to - from
            )),
        }
    }
}

pub struct Generator {
    source: Box<dyn NoteSource>,
    tonic: u8,
    scale_lock: bool,
    seed: u64,
    /// The next step to commit.
    committed: u64,
    /// Decoded but uncommitted steps; `pending[0]` is step `committed`.
    pending: VecDeque<Step>,
    /// Tokens sounding after the last committed step.
    sounding: Step,
    /// What the room hears of them: a note a late step did not start stays silent while its
    /// voice holds it.
    audible: Step,
    /// The last steps committed (at most `HEARD_KEPT`), oldest first: what a source taken back
    /// carries on from.
    heard: VecDeque<Heard>,
    /// Shared with the steps heard under it, so that keeping them costs no copy a step.
    cond: Arc<Conditioning>,
    params: SamplingParams,
    velocity: f32,
    /// Steps to decode beyond what is committed.
    decode_ahead: usize,
    /// Events waiting for room in the queue to the audio thread.
    backlog: VecDeque<NoteEvent>,
    stats: GeneratorStats,
    failed: Option<String>,
    /// Live only: whether the source keeps up with `bpm` (see `pace`). Offline renders run as
    /// fast as the machine allows, so there is no pace to keep.
    pace: Option<Pace>,
    bpm: f64,
    parked: Option<Parked>,
    /// How long a source given up waits before it may come back.
    backoff: Backoff,
}

impl Generator {
    pub fn new(
        source: Box<dyn NoteSource>,
        tonic: u8,
        scale_lock: bool,
        seed: u64,
        cond: Conditioning,
        params: SamplingParams,
        velocity: f32,
    ) -> Self {
        Self {
            source,
            tonic,
            scale_lock,
            seed,
            committed: 0,
            pending: VecDeque::new(),
            sounding: [None; VOICES],
            audible: [None; VOICES],
            heard: VecDeque::with_capacity(HEARD_KEPT),
            cond: Arc::new(cond),
            params,
            velocity,
            decode_ahead: 0,
            backlog: VecDeque::new(),
            stats: GeneratorStats::default(),
            failed: None,
            pace: None,
            bpm: 120.0,
            parked: None,
            backoff: Backoff::new(pace::RETRY_AFTER, pace::FORGIVE_AFTER),
        }
    }

    /// Keeps up to `steps` decoded beyond the committed point, so a step is ready before it is
    /// due and a slow decode does not hold up a commit; a conditioning change rolls them back.
    pub fn with_decode_ahead(mut self, steps: usize) -> Self {
        self.decode_ahead = steps;
        self
    }

    /// Gives the source up for the rule-based one when it cannot keep up with the music in real
    /// time (live play only; see `pace`).
    pub fn watch_pace(&mut self) {
        self.pace = Some(Pace::new());
    }

    pub fn watches_pace(&self) -> bool {
        self.pace.is_some()
    }

    /// The tempo the transport plays at now, which sets how long a step may take.
    pub fn set_tempo(&mut self, bpm: f64) {
        self.bpm = bpm;
    }

    pub fn source_name(&self) -> &str {
        self.source.name()
    }

    pub fn stats(&self) -> GeneratorStats {
        self.stats
    }

    /// Why the configured source was replaced by the fallback, if it was.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    pub fn committed_step(&self) -> u64 {
        self.committed
    }

    /// Starts composing afresh at `step`, with nothing sounding.
    pub fn start_at(&mut self, step: u64) {
        self.start_after(step, &[]);
    }

    /// Starts at `step` carrying on from `heard`, the steps the room heard just before it (the
    /// scene before's last bar): a model hears them and composes on from that music, under its
    /// own conditioning, instead of starting a piece of its own. A source that fails to hear
    /// them is replaced by the rule-based one, as on any failure.
    pub fn start_after(&mut self, step: u64, heard: &[Heard]) {
        self.committed = step;
        self.pending.clear();
        self.sounding = [None; VOICES];
        self.audible = [None; VOICES];
        // What was heard belongs to the old piece; a source still catching up starts over.
        self.heard.clear();
        if let Some(p) = &mut self.parked {
            p.hearing = None;
        }
        // No more than the steps before `step`.
        let heard = &heard[heard.len().saturating_sub(step as usize)..];
        let first = step - heard.len() as u64;
        let started = guarded(self.source.as_mut(), |s| {
            s.start_at(first);
            if heard.is_empty() {
                Ok(())
            } else {
                s.hear(heard)
            }
        });
        match started.map(|()| self.source.position()) {
            Err(e) => self.fall_back(e.to_string()),
            Ok(_) if heard.is_empty() => {}
            Ok(p) if p == step => {
                tracing::info!(
                    source = self.source.name(),
                    "carrying on from the last {} steps the room heard",
                    heard.len()
                );
                self.heard = heard.iter().cloned().collect();
            }
            Ok(p) => self.fall_back(format!(
                "it heard the scene before's {} steps but moved on to step {p}, not {step}",
                heard.len()
            )),
        }
    }

    /// The last `n` steps the room heard up to `step` (those after the last committed are
    /// silence), for the next scene's composer to carry on from.
    pub fn heard_until(&self, step: u64, n: usize) -> Vec<Heard> {
        // No more silence than is asked for, however far behind the commits are.
        let gap = step.saturating_sub(self.committed).min(n as u64);
        let silence = (0..gap).map(|_| Heard {
            step: [None; VOICES],
            cond: Arc::clone(&self.cond),
        });
        let all: Vec<Heard> = self.heard.iter().cloned().chain(silence).collect();
        all[all.len().saturating_sub(n)..].to_vec()
    }

    /// New conditioning and sampling settings; steps decoded ahead under the old ones are
    /// rolled back when the difference matters.
    pub fn set_controls(&mut self, cond: &Conditioning, params: SamplingParams, velocity: f32) {
        let changed = self.cond.differs(cond)
            || (self.params.temperature - params.temperature).abs() > 0.02
            || (self.params.top_p - params.top_p).abs() > 0.01;
        // Kept while it holds, so that the steps heard under it share one.
        if *self.cond != *cond {
            self.cond = Arc::new(cond.clone());
        }
        self.params = params;
        self.velocity = velocity;
        if changed && !self.pending.is_empty() {
            self.pending.clear();
            self.stats.rollbacks += 1;
            let committed = self.committed;
            if let Err(e) = guarded(self.source.as_mut(), |s| s.rollback(committed)) {
                self.fall_back(e.to_string());
            }
        }
    }

    /// Replaces the source for good: it failed.
    fn fall_back(&mut self, why: String) {
        tracing::error!(
            source = self.source.name(),
            "composer failed, switching to the rule-based source: {why}"
        );
        self.parked = None;
        self.replace_with_rules(why);
    }

    /// Live: sets aside a source that cannot keep up, or takes a parked one back. Checked before
    /// every step committed, since a source far behind commits many steps in one `fill`.
    fn judge_pace(&mut self) {
        let now = Instant::now();
        let Some(pace) = &mut self.pace else {
            self.maybe_restore();
            return;
        };
        match pace.verdict(now, self.bpm) {
            Some(behind) => self.fall_behind(behind),
            None => self.backoff.keeping_up(now),
        }
    }

    /// Replaces the source for as long as it cannot keep up (see `maybe_restore`).
    fn fall_behind(&mut self, behind: Behind) {
        let wait = self.backoff.given_up();
        let why = format!(
            "{}. It is timed again in {} s, and comes back if it then keeps up with room to spare; \
             a lighter source (the network alone, guidance 1) or a faster machine keeps it",
            behind.why,
            wait.as_secs()
        );
        tracing::warn!(
            source = self.source.name(),
            "composer cannot keep up, switching to the rule-based source: {why}"
        );
        let source = self.replace_with_rules(why);
        self.parked = Some(Parked {
            source,
            median: behind.median,
            since: Instant::now(),
            timed: 0,
            fastest: Duration::MAX,
            hearing: None,
        });
    }

    /// Takes a parked source back once it would keep up with room to spare: at the tempo now
    /// playing, by its step when it was given up, or else by steps timed now (the host may have
    /// become quieter), since what it composed while parked is thrown away anyway. It first
    /// hears the steps the room last heard, `HEAR_CHUNK` of them before each step committed
    /// (taking them all at once would cost several steps' time at once and make notes late),
    /// and composes on from them once it has caught up.
    fn maybe_restore(&mut self) {
        let wait = self.backoff.wait();
        let Some(p) = self
            .parked
            .as_mut()
            .filter(|p| p.hearing.is_some() || p.since.elapsed() >= wait)
        else {
            return;
        };
        let first_kept = self.committed - self.heard.len() as u64;
        if p.hearing.is_none() {
            match p.retime(&self.cond, &self.params, self.bpm) {
                Retimed::Failed(e) => {
                    tracing::error!(
                        "composer failed while set aside, keeping the rule-based source: {e}"
                    );
                    self.parked = None;
                }
                Retimed::Timing => {}
                Retimed::TooSlow => {
                    tracing::info!(
                        source = p.source.name(),
                        "still set aside: its fastest of {} steps took {:.1} ms, and at {:.0} BPM \
                         it must take under {:.1}; timed again in {} s",
                        p.timed,
                        p.fastest.as_secs_f64() * 1e3,
                        self.bpm,
                        pace::fit_limit(self.bpm).as_secs_f64() * 1e3,
                        wait.as_secs()
                    );
                    p.wait_again();
                }
                Retimed::Fits => {
                    // The steps timed were this call's work; hearing starts at the next commit,
                    // which adds a step to the ring and, when it is full, drops the oldest.
                    let first = first_kept + u64::from(self.heard.len() == HEARD_KEPT);
                    match start_guarded(p.source.as_mut(), first) {
                        Ok(()) => p.hearing = Some((Instant::now(), first)),
                        Err(e) => self.keep_the_rules(e),
                    }
                }
            }
            return;
        }
        match p.hear_next(self.heard.make_contiguous(), first_kept) {
            Err(why) => self.keep_the_rules(why),
            Ok(()) if p.source.position() >= self.committed => self.take_back(),
            Ok(()) => {}
        }
    }

    /// Drops the parked source, which failed as it was being taken back.
    fn keep_the_rules(&mut self, why: impl std::fmt::Display) {
        tracing::error!(
            "composer failed as it was taken back, keeping the rule-based source: {why}"
        );
        self.parked = None;
    }

    /// Composes with the parked source again, which has heard up to the step to commit next.
    fn take_back(&mut self) {
        let Some(Parked {
            source,
            median,
            hearing: Some((began, from_step)),
            ..
        }) = self.parked.take_if(|p| p.hearing.is_some())
        else {
            return;
        };
        tracing::info!(
            source = source.name(),
            "composing with it again: at {:.0} BPM its step ({:.1} ms) fits; it carries on from \
             the last {} steps heard (taken in over {:.2} s)",
            self.bpm,
            median.as_secs_f64() * 1e3,
            self.committed - from_step,
            began.elapsed().as_secs_f64()
        );
        self.source = source;
        self.pending.clear();
        self.pace = Some(Pace::new());
        self.backoff.taken_back(Instant::now());
        self.failed = None;
        self.stats.restores += 1;
    }

    fn replace_with_rules(&mut self, why: String) -> Box<dyn NoteSource> {
        let mut rules = RuleSource::new(self.tonic, self.scale_lock, self.seed);
        rules.resume_at(self.committed, self.sounding);
        self.pending.clear();
        self.pace = None;
        self.failed = Some(why);
        self.stats.fallbacks += 1;
        std::mem::replace(&mut self.source, Box::new(rules))
    }

    fn decode_one(&mut self) -> Step {
        let mut failed_before = false;
        loop {
            let started = self.pace.as_ref().map(|_| Instant::now());
            let (cond, params) = (&self.cond, &self.params);
            match guarded(self.source.as_mut(), |s| s.next_step(cond, params)) {
                Ok(step) => {
                    if let (Some(pace), Some(t)) = (&mut self.pace, started) {
                        pace.decoded(t.elapsed());
                    }
                    return step;
                }
                // The rule-based source never fails; if it did, it would again with the same
                // step and seed, and the thread had better die (the engine then exits, and is
                // started again) than spin.
                Err(e) if failed_before => panic!("the rule-based fallback failed too: {e}"),
                Err(e) => {
                    failed_before = true;
                    self.fall_back(e.to_string());
                }
            }
        }
    }

    /// Commits every step that starts before `horizon_beat`, handing its events to `push`
    /// (which returns false when the queue is full: the event is kept and retried next time).
    /// Steps that start before `playhead_beat - 1` are composed but not sounded.
    pub fn fill(
        &mut self,
        playhead_beat: f64,
        horizon_beat: f64,
        push: &mut dyn FnMut(NoteEvent) -> bool,
    ) {
        if !self.flush(push) {
            return;
        }
        while (self.committed as f64) / (STEPS_PER_BEAT as f64) < horizon_beat {
            self.judge_pace();
            if self.pending.is_empty() {
                let s = self.decode_one();
                self.pending.push_back(s);
            }
            let step = self.pending.pop_front().expect("decoded above");
            let beat = self.committed as f64 / STEPS_PER_BEAT as f64;
            if beat < playhead_beat {
                if let Some(pace) = &mut self.pace {
                    pace.late();
                }
            }
            let late = beat < playhead_beat - 1.0;
            if late {
                self.stats.late_steps += 1;
            }
            for (v, (&old, &new)) in self.sounding.iter().zip(step.iter()).enumerate() {
                if old == new {
                    continue;
                }
                self.audible[v] = if late { None } else { new };
                if let Some(p) = old {
                    self.backlog.push_back(NoteEvent {
                        beat,
                        voice: v as u8,
                        pitch: p,
                        velocity: 0.0,
                        on: false,
                    });
                }
                if let (Some(p), false) = (new, late) {
                    self.stats.notes += 1;
                    self.backlog.push_back(NoteEvent {
                        beat,
                        voice: v as u8,
                        pitch: p,
                        velocity: self.velocity_at(self.committed, v),
                        on: true,
                    });
                }
            }
            self.sounding = step;
            if self.heard.len() == HEARD_KEPT {
                self.heard.pop_front();
            }
            self.heard.push_back(Heard {
                step: self.audible,
                cond: Arc::clone(&self.cond),
            });
            self.committed += 1;
            self.stats.steps += 1;
            if !self.flush(push) {
                return;
            }
        }
        // Ahead of the commits, one step a call: after a scene change, a rollback or a source
        // taken back, the steps ahead come back over the next calls, not in one burst before a
        // commit (five steps under tract, 250 ms, are all of the chorale's lookahead at 120 BPM).
        if self.pending.len() < self.decode_ahead {
            let s = self.decode_one();
            self.pending.push_back(s);
        }
    }

    fn flush(&mut self, push: &mut dyn FnMut(NoteEvent) -> bool) -> bool {
        while let Some(ev) = self.backlog.front() {
            if !push(*ev) {
                self.stats.queue_full += 1;
                return false;
            }
            self.backlog.pop_front();
        }
        true
    }

    /// Accents the beat and the bar, and varies the rest a little, deterministically.
    fn velocity_at(&self, step: u64, voice: usize) -> f32 {
        let accent = match step % 16 {
            0 => 0.12,
            s if s % 4 == 0 => 0.06,
            _ => 0.0,
        };
        let h = (step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (voice as u64 * 0x85EB_CA6B))
            .wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        let jitter = ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.08;
        (self.velocity + accent + jitter).clamp(0.05, 1.0)
    }

    /// Releases every sounding note (a scene change) from `beat` on, and not before the end of
    /// the last step committed: the audio thread holds the notes committed ahead of the
    /// playhead and plays them when due, and a release before a note begins would leave it
    /// sounding. Returns the beat of the releases.
    pub fn release_all(&mut self, beat: f64, push: &mut dyn FnMut(NoteEvent) -> bool) -> f64 {
        let beat = beat.max(self.committed as f64 / STEPS_PER_BEAT as f64);
        for v in 0..VOICES {
            self.audible[v] = None;
            if let Some(p) = self.sounding[v].take() {
                self.backlog.push_back(NoteEvent {
                    beat,
                    voice: v as u8,
                    pitch: p,
                    velocity: 0.0,
                    on: false,
                });
            }
        }
        self.flush(push);
        beat
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gen::SourceError;

    fn cond() -> Conditioning {
        Conditioning {
            density: Some(4.0),
            register: Some(62.0),
            major: Some(1.0),
            styles: vec![],
            tonic: None,
        }
    }
    const P: SamplingParams = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
    };

    fn rules(seed: u64) -> Box<dyn NoteSource> {
        Box::new(RuleSource::new(0, true, seed))
    }

    #[test]
    fn commits_only_within_the_horizon_and_pairs_ons_with_offs() {
        let mut g = Generator::new(rules(1), 0, true, 1, cond(), P, 0.7);
        let mut events = Vec::new();
        g.fill(0.0, 2.0, &mut |e| {
            events.push(e);
            true
        });
        assert_eq!(g.committed_step(), 8);
        assert!(events.iter().all(|e| e.beat < 2.0));
        g.fill(0.0, 64.0, &mut |e| {
            events.push(e);
            true
        });
        let mut sounding = [None; 4];
        for e in &events {
            let v = e.voice as usize;
            if e.on {
                assert_eq!(sounding[v], None, "overlapping notes in voice {v}");
                sounding[v] = Some(e.pitch);
            } else {
                assert_eq!(sounding[v], Some(e.pitch));
                sounding[v] = None;
            }
        }
    }

    #[test]
    fn the_room_heard_each_step_under_its_conditioning_and_no_note_a_late_step_skipped() {
        let other = Conditioning {
            density: Some(7.0),
            ..cond()
        };
        // Steps 0..8 under one conditioning, 8..24 under another, and 16..24 committed when the
        // playhead is past them by more than a beat (`late`) or, in the twin, on time.
        let play = |late: bool| {
            let mut g = Generator::new(rules(3), 0, true, 3, cond(), P, 0.7);
            let mut events = Vec::new();
            let mut push = |e| {
                events.push(e);
                true
            };
            g.fill(0.0, 2.0, &mut push);
            g.set_controls(&other, P, 0.7);
            g.fill(2.0, 4.0, &mut push);
            g.fill(if late { 7.5 } else { 4.0 }, 6.0, &mut push);
            let ring: Vec<Heard> = g.heard.iter().cloned().collect();
            (g.stats().late_steps, ring, events)
        };
        let (late_steps, ring, events) = play(true);
        let (on_time, twin, _) = play(false);
        assert_eq!((late_steps, on_time, ring.len()), (8, 0, 24));
        let first = cond();
        let conds: Vec<&Conditioning> = ring.iter().map(|h| &*h.cond).collect();
        assert_eq!(conds[..8], [&first; 8]);
        assert_eq!(conds[8..], [&other; 16]);
        let steps: Vec<Step> = ring.iter().map(|h| h.step).collect();
        let composed: Vec<Step> = twin.iter().map(|h| h.step).collect();
        // What the room heard is what the note events say, and the same music up to the late
        // steps; there, a voice is silent or what was composed.
        let played = Played {
            events,
            ..Played::default()
        };
        let mut grid = played.grid();
        // A late step's note-offs end the grid where the last voice fell silent.
        grid.resize(24, grid.last().copied().unwrap_or_default());
        assert_eq!(steps, grid);
        assert_eq!(steps[..16], composed[..16]);
        assert_ne!(
            steps[16..],
            composed[16..],
            "the late steps left nothing out"
        );
        for (heard, made) in steps[16..].iter().zip(&composed[16..]) {
            for (h, m) in heard.iter().zip(made) {
                assert!(h.is_none() || h == m, "{heard:?} heard, {made:?} composed");
            }
        }
    }

    #[test]
    fn full_queue_is_retried_not_lost() {
        let mut g = Generator::new(rules(2), 0, true, 2, cond(), P, 0.7);
        let mut all = Vec::new();
        g.fill(0.0, 16.0, &mut |e| {
            all.push(e);
            true
        });
        let mut g = Generator::new(rules(2), 0, true, 2, cond(), P, 0.7);
        let mut got = Vec::new();
        let mut room = 3;
        for _ in 0..200 {
            g.fill(0.0, 16.0, &mut |e| {
                if room == 0 {
                    return false;
                }
                room -= 1;
                got.push(e);
                true
            });
            room = 3;
        }
        assert_eq!(got, all);
        assert!(g.stats().queue_full > 0);
    }

    /// The rule-based source, but a bug: it panics at step `at` (in `next_step`, or in the
    /// rollback to it), as an index out of bounds in a composer would.
    struct Panicking {
        inner: RuleSource,
        at: u64,
        in_rollback: bool,
    }
    impl NoteSource for Panicking {
        fn name(&self) -> &str {
            "panicking"
        }
        fn position(&self) -> u64 {
            self.inner.position()
        }
        fn next_step(&mut self, c: &Conditioning, p: &SamplingParams) -> Result<Step, SourceError> {
            if !self.in_rollback && self.inner.position() == self.at {
                panic!("index out of bounds at step {}", self.at);
            }
            self.inner.next_step(c, p)
        }
        fn rollback(&mut self, step: u64) -> Result<(), SourceError> {
            if self.in_rollback && step == self.at {
                panic!("rolled back into a bug at step {step}");
            }
            self.inner.rollback(step)
        }
        fn start_at(&mut self, step: u64) {
            self.inner.start_at(step)
        }
    }

    #[test]
    fn a_source_that_panics_falls_back_and_music_goes_on() {
        for in_rollback in [false, true] {
            let source = Panicking {
                inner: RuleSource::new(0, true, 4),
                at: if in_rollback { 8 } else { 10 },
                in_rollback,
            };
            let mut g =
                Generator::new(Box::new(source), 0, true, 4, cond(), P, 0.7).with_decode_ahead(4);
            let mut notes = [0; 2];
            g.fill(0.0, 2.0, &mut |e| {
                notes[0] += e.on as usize;
                true
            });
            assert_eq!(g.source_name(), "panicking", "{in_rollback}");
            // Step 8 was decoded ahead; a new conditioning rolls it back, into the bug.
            let other = Conditioning {
                density: Some(7.0),
                ..cond()
            };
            g.set_controls(&other, P, 0.7);
            g.fill(2.0, 8.0, &mut |e| {
                notes[1] += e.on as usize;
                true
            });
            assert_eq!(g.source_name(), "rules", "{in_rollback}");
            assert_eq!(g.committed_step(), 32);
            assert_eq!(g.stats().fallbacks, 1);
            let why = g.failure().unwrap();
            let bug = if in_rollback {
                "it panicked: rolled back into a bug at step 8"
            } else {
                "it panicked: index out of bounds at step 10"
            };
            assert!(why.contains(bug), "{why}");
            assert!(notes[0] > 0 && notes[1] > 0, "{notes:?}");
        }
    }

    struct Failing(u64);
    impl NoteSource for Failing {
        fn name(&self) -> &str {
            "failing"
        }
        fn position(&self) -> u64 {
            self.0
        }
        fn next_step(&mut self, _: &Conditioning, _: &SamplingParams) -> Result<Step, SourceError> {
            if self.0 >= 5 {
                return Err(SourceError::Failed {
                    source_name: "failing".into(),
                    message: "session exploded".into(),
                });
            }
            self.0 += 1;
            Ok([Some(60), None, None, None])
        }
        fn rollback(&mut self, step: u64) -> Result<(), SourceError> {
            self.0 = step;
            Ok(())
        }
        fn start_at(&mut self, step: u64) {
            self.0 = step;
        }
    }

    #[test]
    fn a_failing_source_falls_back_and_music_goes_on() {
        let mut g = Generator::new(Box::new(Failing(0)), 0, true, 3, cond(), P, 0.7);
        let mut n = 0;
        g.fill(0.0, 16.0, &mut |_| {
            n += 1;
            true
        });
        assert_eq!(g.source_name(), "rules");
        assert_eq!(g.committed_step(), 64);
        assert!(g.failure().unwrap().contains("session exploded"));
        assert!(n > 10);
    }

    #[test]
    fn decoded_ahead_steps_roll_back_on_a_change() {
        let mut g = Generator::new(rules(4), 0, true, 4, cond(), P, 0.7).with_decode_ahead(8);
        g.fill(0.0, 1.0, &mut |_| true);
        assert_eq!(g.committed_step(), 4);
        let mut c = cond();
        c.density = Some(12.0);
        g.set_controls(&c, P, 0.7);
        assert_eq!(g.stats().rollbacks, 1);
        // What comes next is what a generator that never decoded ahead composes.
        let mut got = Vec::new();
        g.fill(0.0, 3.0, &mut |e| {
            got.push(e);
            true
        });
        let mut g2_events = Vec::new();
        let mut g2 = Generator::new(rules(4), 0, true, 4, cond(), P, 0.7);
        g2.fill(0.0, 1.0, &mut |_| true);
        g2.set_controls(&c, P, 0.7);
        g2.fill(0.0, 3.0, &mut |e| {
            g2_events.push(e);
            true
        });
        assert_eq!(got, g2_events);
        assert!(!got.is_empty());
    }

    /// The rule-based source, counting the steps it composes.
    struct Counted(RuleSource, std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl NoteSource for Counted {
        fn name(&self) -> &str {
            "counted"
        }
        fn position(&self) -> u64 {
            self.0.position()
        }
        fn next_step(&mut self, c: &Conditioning, p: &SamplingParams) -> Result<Step, SourceError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.next_step(c, p)
        }
        fn rollback(&mut self, step: u64) -> Result<(), SourceError> {
            self.0.rollback(step)
        }
        fn start_at(&mut self, step: u64) {
            self.0.start_at(step)
        }
    }

    #[test]
    fn steps_ahead_come_back_one_a_call_not_in_a_burst() {
        let decoded = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = || decoded.swap(0, std::sync::atomic::Ordering::Relaxed);
        let source = Counted(RuleSource::new(0, true, 9), decoded.clone());
        let mut g =
            Generator::new(Box::new(source), 0, true, 9, cond(), P, 0.7).with_decode_ahead(4);
        // Four steps committed, each decoded as it is due, and one ahead.
        g.fill(0.0, 1.0, &mut |_| true);
        assert_eq!((g.committed_step(), count()), (4, 5));
        // Calls with nothing to commit decode one ahead each, up to four.
        for _ in 0..5 {
            g.fill(0.0, 1.0, &mut |_| true);
        }
        assert_eq!(count(), 3);
        // A commit takes a step decoded ahead, and one more comes.
        g.fill(0.0, 1.25, &mut |_| true);
        assert_eq!((g.committed_step(), count()), (5, 1));
        // After a rollback: the step due, and one ahead; not the four ahead at once.
        let mut c = cond();
        c.density = Some(12.0);
        g.set_controls(&c, P, 0.7);
        assert_eq!(g.stats().rollbacks, 1);
        g.fill(0.0, 1.5, &mut |_| true);
        assert_eq!((g.committed_step(), count()), (6, 2));
    }

    /// A scene change: the next scene's source hears the bar the room last heard, silence
    /// included up to where it starts, and composes on from there.
    #[test]
    fn the_next_scene_carries_on_from_the_bar_the_room_heard() {
        let mut old = Generator::new(rules(5), 0, true, 5, cond(), P, 0.7);
        old.fill(0.0, 8.0, &mut |_| true);
        assert_eq!(old.committed_step(), 32);
        let start = 34;
        let carried = old.heard_until(start, 16);
        let steps = |h: &[Heard]| h.iter().map(|h| h.step).collect::<Vec<_>>();
        let ring: Vec<Heard> = old.heard.iter().cloned().collect();
        assert_eq!(steps(&carried[..14]), steps(&ring[18..32]));
        assert_eq!(steps(&carried[14..]), [[None; VOICES]; 2]);
        assert!(ring[18..32]
            .iter()
            .any(|h| h.step.iter().any(Option::is_some)));

        let chunks: HeardChunks = Default::default();
        let source = Box::new(Slowed {
            inner: RuleSource::new(0, true, 6),
            sleep: std::sync::Arc::new(0.into()),
            stall: None,
            heard: chunks.clone(),
        });
        let mut new = Generator::new(source, 0, true, 6, cond(), P, 0.7);
        new.start_after(start, &carried);
        {
            let got = chunks.lock().unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].0, start - 16, "heard as the steps before the start");
            assert_eq!(steps(&got[0].1), steps(&carried));
        }
        assert_eq!((new.committed_step(), new.failure()), (start, None));
        assert_eq!(new.source_name(), "slowed");
        let mut first = None;
        new.fill(8.5, 10.0, &mut |e| {
            first.get_or_insert(e.beat);
            true
        });
        assert!(
            first.is_some_and(|b| b >= 8.5),
            "begins at the start: {first:?}"
        );
        // What it carries on from is what a source taken back later would hear, too.
        assert_eq!(
            steps(&new.heard.iter().cloned().collect::<Vec<_>>()[..16]),
            steps(&carried)
        );
    }

    /// The rule-based source, `sleep` longer on every step, and once for `stall` on step `at`.
    struct Slowed {
        inner: RuleSource,
        /// Milliseconds a step, shared so that a test can change it while the source plays.
        sleep: std::sync::Arc<std::sync::atomic::AtomicU64>,
        stall: Option<(u64, std::time::Duration)>,
        heard: HeardChunks,
    }
    /// Where each `hear` began, and the steps it was handed.
    type HeardChunks = std::sync::Arc<std::sync::Mutex<Vec<(u64, Vec<Heard>)>>>;
    impl NoteSource for Slowed {
        fn name(&self) -> &str {
            "slowed"
        }
        fn position(&self) -> u64 {
            self.inner.position()
        }
        fn next_step(&mut self, c: &Conditioning, p: &SamplingParams) -> Result<Step, SourceError> {
            let ms = self.sleep.load(std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            if let Some((at, d)) = self.stall {
                if self.inner.position() == at {
                    std::thread::sleep(d);
                }
            }
            self.inner.next_step(c, p)
        }
        fn rollback(&mut self, step: u64) -> Result<(), SourceError> {
            self.inner.rollback(step)
        }
        fn start_at(&mut self, step: u64) {
            self.inner.start_at(step)
        }
        fn hear(&mut self, heard: &[Heard]) -> Result<(), SourceError> {
            let at = self.inner.position();
            self.heard.lock().unwrap().push((at, heard.to_vec()));
            let last = heard.last().map(|h| h.step).unwrap_or_default();
            self.inner.resume_at(at + heard.len() as u64, last);
            Ok(())
        }
    }

    fn slowed(seed: u64, ms: u64, stall: Option<(u64, u64)>) -> Box<dyn NoteSource> {
        slowed_by(seed, std::sync::Arc::new(ms.into()), stall)
    }

    fn slowed_by(
        seed: u64,
        ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
        stall: Option<(u64, u64)>,
    ) -> Box<dyn NoteSource> {
        Box::new(Slowed {
            inner: RuleSource::new(0, true, seed),
            sleep: ms,
            stall: stall.map(|(at, ms)| (at, std::time::Duration::from_millis(ms))),
            heard: Default::default(),
        })
    }

    /// What happened while `g` played live.
    #[derive(Default)]
    struct Played {
        /// When the source changed, and to which.
        changes: Vec<(f64, String)>,
        /// Notes started under each source in turn (the first, then one per change).
        notes: Vec<usize>,
        events: Vec<NoteEvent>,
    }

    impl Played {
        /// Each voice's pitch at each step, by the events heard. Notes a late step did not sound
        /// are not there.
        fn grid(&self) -> Vec<Step> {
            let mut grid: Vec<Step> = Vec::new();
            for e in &self.events {
                let at = (e.beat * STEPS_PER_BEAT as f64).round() as usize;
                while grid.len() <= at {
                    let last = grid.last().copied().unwrap_or_default();
                    grid.push(last);
                }
                let v = &mut grid[at][e.voice as usize];
                if e.on {
                    *v = Some(e.pitch);
                } else if *v == Some(e.pitch) {
                    *v = None;
                }
            }
            grid
        }
    }

    /// Plays `g` live (half a beat of lookahead) at `bpm(seconds since the start)`, for
    /// `seconds`, or until a second after `changes` source changes.
    fn play_live(
        g: &mut Generator,
        bpm: impl Fn(f64) -> f64,
        seconds: f64,
        changes: usize,
    ) -> Played {
        g.watch_pace();
        let start = Instant::now();
        let mut heard = Played {
            notes: vec![0],
            ..Played::default()
        };
        let (mut playhead, mut last) = (0.0, 0.0);
        let mut name = g.source_name().to_string();
        loop {
            let now = start.elapsed().as_secs_f64();
            if now > seconds
                || heard.changes.len() >= changes && now > heard.changes[changes - 1].0 + 1.0
            {
                return heard;
            }
            let tempo = bpm(now);
            playhead += (now - last) * tempo / 60.0;
            last = now;
            g.set_tempo(tempo);
            let n = heard.notes.last_mut().unwrap();
            let events = &mut heard.events;
            g.fill(playhead, playhead + 0.5, &mut |e| {
                *n += e.on as usize;
                events.push(e);
                true
            });
            if g.source_name() != name {
                name = g.source_name().to_string();
                heard
                    .changes
                    .push((start.elapsed().as_secs_f64(), name.clone()));
                heard.notes.push(0);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[test]
    fn live_a_source_that_cannot_keep_up_gives_way_and_the_music_goes_on() {
        // 480 BPM: a step every 31.25 ms, composed in 40.
        let mut g =
            Generator::new(slowed(5, 40, None), 0, true, 5, cond(), P, 0.7).with_decode_ahead(4);
        let heard = play_live(&mut g, |_| 480.0, 15.0, 1);
        let (t, name) = heard
            .changes
            .first()
            .expect("the slow source was kept for 15 s");
        assert_eq!(name, "rules");
        // Three windows of two seconds once the first step is decoded; the scheduler may add.
        assert!((5.9..12.0).contains(t), "gave up after {t:.1} s");
        let why = g.failure().unwrap();
        assert!(
            why.contains("a step takes 4") && why.contains("480 BPM"),
            "{why}"
        );
        assert!(why.contains("timed again in 30 s"), "{why}");
        assert!(heard.notes[1] > 10, "{:?} notes", heard.notes);
        // Offline (no pace watched) the same source is never given up.
        let mut g = Generator::new(slowed(5, 40, None), 0, true, 5, cond(), P, 0.7);
        g.set_tempo(480.0);
        g.fill(0.0, 8.0, &mut |_| true);
        assert_eq!(g.committed_step(), 32);
        assert_eq!(g.source_name(), "slowed");
    }

    #[test]
    fn live_a_source_given_up_comes_back_when_the_tempo_comes_down() {
        let source = Slowed {
            inner: RuleSource::new(0, true, 7),
            sleep: std::sync::Arc::new(40.into()),
            stall: None,
            heard: Default::default(),
        };
        let chunks = source.heard.clone();
        let mut g =
            Generator::new(Box::new(source), 0, true, 7, cond(), P, 0.7).with_decode_ahead(4);
        g.backoff = Backoff::new(Duration::from_secs(1), pace::FORGIVE_AFTER);
        // 480 BPM for 15 s (it gives way after about 6), then 120 BPM (125 ms a step: 40 ms
        // fits). At 480 it is timed again every second, and does not fit.
        let heard = play_live(&mut g, |t| if t < 15.0 { 480.0 } else { 120.0 }, 22.0, 2);
        let names: Vec<&str> = heard.changes.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["rules", "slowed"], "{:?}", heard.changes);
        let (back, _) = heard.changes[1];
        assert!(
            back >= 15.0,
            "taken back at {back:.1} s, while still at 480 BPM"
        );
        assert_eq!(g.stats().restores, 1);
        assert_eq!(g.failure(), None);
        assert!(heard.notes[2] > 0, "{:?} notes", heard.notes);
        assert!(g.watches_pace());
        // It caught up with what the room heard, the rule-based source's music, from 16 beats
        // before it was taken back on (120 BPM from 15 s on, so none of them was late), a few
        // steps before each step committed, and carries on from there.
        let chunks = chunks.lock().unwrap();
        let start = chunks[0].0 as usize;
        let mut handed = Vec::new();
        for (at, chunk) in chunks.iter() {
            assert_eq!(*at as usize, start + handed.len(), "chunks in order");
            assert!(
                !chunk.is_empty() && chunk.len() <= HEAR_CHUNK,
                "{}",
                chunk.len()
            );
            handed.extend_from_slice(chunk);
        }
        // One step committed after each chunk, the last one's the model's own.
        assert_eq!(handed.len(), HEARD_KEPT + chunks.len() - 1);
        let grid = heard.grid();
        assert!(grid.len() > start + handed.len(), "nothing heard after it");
        let steps: Vec<Step> = handed.iter().map(|h| h.step).collect();
        assert_eq!(steps[..], grid[start..start + handed.len()]);
        assert!(steps.iter().flatten().any(|t| t.is_some()));
        assert!(handed.iter().all(|h| *h.cond == cond()));
    }

    #[test]
    fn live_a_source_given_up_comes_back_when_the_host_gets_quicker() {
        let ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(40));
        let mut g = Generator::new(slowed_by(8, ms.clone(), None), 0, true, 8, cond(), P, 0.7)
            .with_decode_ahead(4);
        g.backoff = Backoff::new(Duration::from_secs(1), pace::FORGIVE_AFTER);
        // 480 BPM throughout; the steps take 40 ms for 12 s, then 4 (under half of 31.25).
        let slow_until = 12.0;
        let heard = play_live(
            &mut g,
            |t| {
                if t >= slow_until {
                    ms.store(4, std::sync::atomic::Ordering::Relaxed);
                }
                480.0
            },
            20.0,
            2,
        );
        let names: Vec<&str> = heard.changes.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["rules", "slowed"], "{:?}", heard.changes);
        let (back, _) = heard.changes[1];
        assert!(
            back >= slow_until,
            "taken back at {back:.1} s, while still slow"
        );
        assert_eq!(g.stats().restores, 1);
    }

    #[test]
    fn live_a_host_stall_does_not_cost_a_source_that_keeps_up() {
        // 240 BPM, a step composed in 2 ms, but step 20 stalls for 2.5 s, which puts the
        // steps after it 40 steps behind.
        let mut g = Generator::new(slowed(6, 2, Some((20, 2500))), 0, true, 6, cond(), P, 0.7)
            .with_decode_ahead(4);
        let heard = play_live(&mut g, |_| 240.0, 9.0, 1);
        assert!(
            heard.changes.is_empty(),
            "{:?}: {:?}",
            heard.changes,
            g.failure()
        );
        assert!(g.stats().late_steps > 0, "the stall made no step late");
    }
}
