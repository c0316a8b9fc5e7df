//! One running engine, outside the audio thread: the `Conductor` (control loop, scene changes,
//! sample layers, commands to the audio thread) and the `Composer` (the generator, feeding the
//! note queue ahead of the playhead). Live, each runs on its own thread; offline, the renderer
//! steps both in lockstep with the audio engine, which is what makes renders reproducible.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::audio::{
    AudioEngine, Command, LayerError, Layers, LiveNote, Rig, RigHandle, Telemetry, TempoTarget,
};
use crate::control::{ControlLoop, Controls};
use crate::gen::rules::RuleSource;
use crate::gen::{Generator, NoteEvent, NoteSource, SamplingParams, STEPS_PER_BEAT};
use crate::input::{InputEvent, TimedEvent, When};
use crate::midi::Score;
use crate::scene::{InputName, Scene, SceneError, SourceKind};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Scene(#[from] SceneError),
    #[error(transparent)]
    Layer(#[from] LayerError),
}

/// Logs an input or a reload that failed, after which the scene that plays goes on: the room
/// keeps it live, and a replay or a render of the room's log keeps it at the same point.
pub fn log_scene_kept(e: &dyn std::fmt::Display) {
    tracing::error!("{e}; keeping the scene that plays");
}

/// Builds the composer a scene asks for. A model that cannot run is logged once and replaced by
/// the rule-based source, so the room never goes silent.
pub fn make_source(scene: &Scene, seed: u64) -> Box<dyn NoteSource> {
    let rules = || {
        Box::new(RuleSource::new(
            scene.tonic,
            scene.generator.scale_lock,
            seed,
        ))
    };
    match scene.generator.source {
        SourceKind::Rules => rules(),
        SourceKind::Model => match crate::model_source(scene, seed) {
            Ok(source) => source,
            Err(why) => {
                tracing::error!("model cannot run, playing the rule-based source instead: {why}");
                rules()
            }
        },
    }
}

/// The sampling settings a scene's composer runs with under `c`.
pub fn sampling(c: &Controls, scene: &Scene) -> SamplingParams {
    SamplingParams {
        temperature: c.temperature,
        top_p: scene.generator.top_p,
    }
}

/// What the composer plays: the generator, or a given score.
pub enum Composition {
    Generated(Box<Generator>),
    Score { events: Vec<NoteEvent>, next: usize },
}

/// Steps of the scene before that the next scene's composer hears, to carry on from: a bar.
/// Heard at once as the scenes change: the chorale scene's model (guided) took 19-25 ms for it
/// under ONNX Runtime and 61-72 ms under tract on a 2-vCPU VM (2.5-3 and 1.2-1.5 of its decoded
/// steps), well inside the half beat of lookahead (380-455 ms) the new piece starts after.
const CARRIED_STEPS: usize = 16;

/// One of the shipped scenes, for tests.
#[cfg(test)]
pub(crate) fn test_scene(name: &str) -> Scene {
    let scenes = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenes");
    Scene::load(scenes.join(format!("{name}.toml"))).unwrap()
}

/// An engine's parts for `scene` at 48 kHz, its scene changes looking among the shipped scenes,
/// for tests.
#[cfg(test)]
pub(crate) fn test_parts(scene: Scene, seed: u64) -> Parts {
    build(
        scene,
        BuildOptions {
            sample_rate: 48_000.0,
            seed: Some(seed),
            score: None,
            recorder: None,
            scenes_dir: &Path::new(env!("CARGO_MANIFEST_DIR")).join("scenes"),
        },
    )
    .unwrap()
}

/// How far ahead of its sample a time-tagged note is handed to the audio thread, which places
/// it exactly; the audio thread's pending list stays short.
pub fn note_lead(sample_rate: f64) -> u64 {
    (sample_rate / 4.0) as u64
}

/// Messages from the conductor to the composer.
pub enum ComposerMsg {
    Controls {
        controls: Controls,
        params: SamplingParams,
    },
    /// A new scene's generator; the old one's notes are released.
    Replace {
        composition: Composition,
        lookahead: f64,
    },
}

/// The generator side: fills the note queue up to the lookahead.
pub struct Composer {
    composition: Composition,
    notes: rtrb::Producer<NoteEvent>,
    lookahead: f64,
    /// Every event sent, kept for the MIDI file of a render.
    pub capture: Option<Vec<NoteEvent>>,
    /// The name of the source now composing, for `/roomscore/status`.
    pub source_name: Arc<Mutex<String>>,
    /// Playing in real time: every generator, this scene's and the next's, is watched for
    /// keeping up (see `Generator::watch_pace`).
    live: bool,
}

impl Composer {
    pub fn new(composition: Composition, notes: rtrb::Producer<NoteEvent>, lookahead: f64) -> Self {
        let name = match &composition {
            Composition::Generated(g) => g.source_name().to_string(),
            Composition::Score { .. } => "score".to_string(),
        };
        Self {
            composition,
            notes,
            lookahead,
            capture: None,
            source_name: Arc::new(Mutex::new(name)),
            live: false,
        }
    }

    /// Live play: a source that cannot keep up with the music is replaced by the rule-based
    /// one, as a failing one is.
    pub fn watch_pace(&mut self) {
        self.live = true;
        if let Composition::Generated(g) = &mut self.composition {
            g.watch_pace();
        }
    }

    /// `fill`, live, at the transport's tempo now.
    pub fn fill_live(&mut self, playhead: f64, bpm: f64) {
        if let Composition::Generated(g) = &mut self.composition {
            g.set_tempo(bpm);
        }
        self.fill(playhead);
    }

    /// Publishes the source's name when it changed (a scene change, or a fallback).
    fn publish_source(&self) {
        let name = self.source_name();
        if let Ok(mut shown) = self.source_name.lock() {
            if *shown != name {
                *shown = name.to_string();
            }
        }
    }

    pub fn source_name(&self) -> &str {
        match &self.composition {
            Composition::Generated(g) => g.source_name(),
            Composition::Score { .. } => "score",
        }
    }

    pub fn generator(&self) -> Option<&Generator> {
        match &self.composition {
            Composition::Generated(g) => Some(g),
            Composition::Score { .. } => None,
        }
    }

    pub fn handle(&mut self, msg: ComposerMsg, playhead: f64) {
        match msg {
            ComposerMsg::Controls { controls, params } => {
                if let Composition::Generated(g) = &mut self.composition {
                    // A rollback the new controls ask for can fail the source, too.
                    let before = g.stats().fallbacks;
                    g.set_controls(&controls.cond, params, controls.velocity);
                    if g.stats().fallbacks != before {
                        self.publish_source();
                    }
                }
            }
            ComposerMsg::Replace {
                composition,
                lookahead,
            } => {
                let (notes, capture) = (&mut self.notes, &mut self.capture);
                let mut push = |e: NoteEvent| push_note(notes, capture, e);
                // The old notes end where the old composer's commits end, and the new piece
                // starts there at the earliest, so no voice is sounded by both.
                let mut start = ((playhead + lookahead) * STEPS_PER_BEAT as f64).ceil() as u64;
                let mut carried = Vec::new();
                if let Composition::Generated(old) = &mut self.composition {
                    let released = old.release_all(playhead, &mut push);
                    start = start.max((released * STEPS_PER_BEAT as f64).ceil() as u64);
                    carried = old.heard_until(start, CARRIED_STEPS);
                }
                self.composition = composition;
                self.lookahead = lookahead;
                if self.live {
                    self.watch_pace();
                }
                if let Composition::Generated(g) = &mut self.composition {
                    g.start_after(start, &carried);
                }
                self.publish_source();
            }
        }
    }

    /// Sends every note due before `playhead + lookahead`.
    pub fn fill(&mut self, playhead: f64) {
        let horizon = playhead + self.lookahead;
        let (notes, capture) = (&mut self.notes, &mut self.capture);
        match &mut self.composition {
            Composition::Generated(g) => {
                let changes = |g: &Generator| g.stats().fallbacks + g.stats().restores;
                let before = changes(g);
                g.fill(playhead, horizon, &mut |e| push_note(notes, capture, e));
                if changes(g) != before {
                    self.publish_source();
                }
            }
            Composition::Score { events, next } => {
                while let Some(e) = events.get(*next) {
                    if e.beat >= horizon || !push_note(notes, capture, *e) {
                        break;
                    }
                    *next += 1;
                }
            }
        }
    }
}

fn push_note(
    notes: &mut rtrb::Producer<NoteEvent>,
    capture: &mut Option<Vec<NoteEvent>>,
    e: NoteEvent,
) -> bool {
    if notes.push(e).is_err() {
        return false;
    }
    if let Some(c) = capture {
        c.push(e);
    }
    true
}

/// The control side: room inputs, scene changes, parameters, commands.
pub struct Conductor {
    pub scene: Scene,
    scenes_dir: PathBuf,
    pub control: ControlLoop,
    rig: RigHandle,
    layers: Layers,
    commands: rtrb::Producer<Command>,
    garbage: rtrb::Consumer<Box<Rig>>,
    pub tempo: Arc<TempoTarget>,
    pub telemetry: Arc<Telemetry>,
    sample_rate: f32,
    seed: u64,
    /// Inputs time-tagged for later, waiting for their sample.
    scheduled: Vec<(u64, InputEvent)>,
    /// Commands that found the audio queue full, retried each tick.
    backlog: std::collections::VecDeque<Command>,
    pub commands_full: u64,
    /// Timed inputs refused because twice `osc::MAX_SCHEDULED` already waited.
    pub scheduled_full: u64,
    pub last_controls: Option<Controls>,
    /// Tempo changes as (beat, BPM), for the MIDI file of a render.
    pub tempo_log: Vec<(f64, f64)>,
    /// The composer's source, as it publishes it.
    pub source_name: Arc<Mutex<String>>,
    /// Whether the opening hours were open at the last look; `None` before the first.
    hours_open: Option<bool>,
}

/// Everything a running engine is made of.
pub struct Parts {
    pub engine: AudioEngine,
    pub conductor: Conductor,
    pub composer: Composer,
}

pub struct BuildOptions<'a> {
    pub sample_rate: f32,
    pub seed: Option<u64>,
    pub score: Option<Score>,
    pub recorder: Option<rtrb::Producer<f32>>,
    pub scenes_dir: &'a Path,
}

pub fn build(scene: Scene, opts: BuildOptions) -> Result<Parts, SessionError> {
    let sr = opts.sample_rate;
    let seed = opts.seed.unwrap_or(scene.generator.seed);
    let (rig, handle) = Rig::build(&scene, sr);
    // Always, even for a scene without layers: a scene switched to later may have some, and
    // the audio thread cannot be handed a renderer once it runs.
    let (mut layers, renderer) = Layers::new(sr as u32)?;
    let decoded = Layers::decode(&scene)?;
    layers.play(&scene, decoded)?;
    let mut control = ControlLoop::new(&scene);
    let composition = match opts.score {
        Some(score) => {
            if let Some(t) = score.tempo {
                control.set_scene_tempo(t);
            }
            Composition::Score {
                events: score.events,
                next: 0,
            }
        }
        None => Composition::Generated(Box::new(new_generator(&scene, &control.tick(0.0), seed))),
    };
    let controls = control.tick(0.0);
    handle.apply(&controls);
    let tempo = Arc::new(TempoTarget::new(controls.tempo));
    let telemetry = Arc::new(Telemetry::default());
    let (engine, queues) = AudioEngine::new(
        rig,
        sr,
        tempo.clone(),
        telemetry.clone(),
        Some(renderer),
        opts.recorder,
    );
    let composer = Composer::new(composition, queues.notes, scene.generator.lookahead);
    let conductor = Conductor {
        scenes_dir: opts.scenes_dir.to_path_buf(),
        control,
        rig: handle,
        layers,
        commands: queues.commands,
        garbage: queues.garbage,
        tempo,
        telemetry,
        sample_rate: sr,
        seed,
        scheduled: Vec::new(),
        backlog: Default::default(),
        commands_full: 0,
        scheduled_full: 0,
        last_controls: None,
        tempo_log: vec![(0.0, controls.tempo)],
        source_name: composer.source_name.clone(),
        hours_open: None,
        scene,
    };
    Ok(Parts {
        engine,
        conductor,
        composer,
    })
}

fn new_generator(scene: &Scene, controls: &Controls, seed: u64) -> Generator {
    let source = make_source(scene, seed);
    let ahead = if source.name() == "rules" { 0 } else { 4 };
    Generator::new(
        source,
        scene.tonic,
        scene.generator.scale_lock,
        seed,
        controls.cond.clone(),
        sampling(controls, scene),
        controls.velocity,
    )
    .with_decode_ahead(ahead)
}

/// What handling an input asks of the caller.
pub enum Outcome {
    Nothing,
    /// Send this to the composer.
    Composer(ComposerMsg),
    /// Reply to a status request.
    Status(std::net::SocketAddr),
}

impl Conductor {
    pub fn send(&mut self, cmd: Command) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(cmd);
            return;
        }
        if let Err(rtrb::PushError::Full(cmd)) = self.commands.push(cmd) {
            self.commands_full += 1;
            self.backlog.push_back(cmd);
        }
    }

    fn flush(&mut self) {
        while let Some(cmd) = self.backlog.pop_front() {
            if let Err(rtrb::PushError::Full(cmd)) = self.commands.push(cmd) {
                self.backlog.push_front(cmd);
                break;
            }
        }
    }

    pub fn now_sample(&self) -> u64 {
        self.telemetry
            .sample_clock
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn note_lead(&self) -> u64 {
        note_lead(f64::from(self.sample_rate))
    }

    /// When a scheduled event is due: notes a little early (the audio thread places them on
    /// their sample), everything else at its sample.
    fn due_at(&self, sample: u64, event: &InputEvent) -> u64 {
        match event {
            InputEvent::Note { .. } => sample.saturating_sub(self.note_lead()),
            _ => sample,
        }
    }

    /// Timed inputs waiting for their time (the OSC thread stops taking them at
    /// `osc::MAX_SCHEDULED`).
    pub fn scheduled_len(&self) -> usize {
        self.scheduled.len()
    }

    /// Applies one input. Notes go to the audio thread (on their sample, when tagged); anything
    /// tagged for later waits here until it is due.
    pub fn handle(&mut self, ev: TimedEvent) -> Result<Outcome, SessionError> {
        if let When::Sample(s) = ev.when {
            if self.due_at(s, &ev.event) > self.now_sample() {
                // The OSC thread keeps the count under its limit; this only bounds what a path
                // that does not (a replay's live inputs between two counts) could add.
                if self.scheduled.len() < 2 * crate::input::osc::MAX_SCHEDULED {
                    self.scheduled.push((s, ev.event));
                } else {
                    self.scheduled_full += 1;
                }
                return Ok(Outcome::Nothing);
            }
        }
        let at = match ev.when {
            When::Sample(s) => Some(s),
            When::Now => None,
        };
        self.apply(ev.event, at)
    }

    fn apply(&mut self, event: InputEvent, at: Option<u64>) -> Result<Outcome, SessionError> {
        match event {
            InputEvent::Movement(v) => self.control.set_input(InputName::Movement, v),
            InputEvent::Mood { valence, arousal } => {
                self.control.set_input(InputName::Valence, valence);
                self.control.set_input(InputName::Arousal, arousal);
            }
            InputEvent::Presence(n) => self.control.set_input(InputName::Presence, n as f32),
            InputEvent::Named(name, v) => self.control.set_input(InputName::Named(name), v),
            InputEvent::Tempo(bpm) => self.control.set_tempo(bpm as f64),
            InputEvent::Volume(v) => self.control.set_volume(v),
            InputEvent::Note { pitch, velocity } => self.send(Command::Note {
                note: LiveNote::new(pitch, velocity),
                at,
            }),
            InputEvent::Scene(name) => {
                let path = crate::scene::resolve(&name, &self.scenes_dir);
                let scene = Scene::load(&path)?;
                return self.switch_scene(scene).map(Outcome::Composer);
            }
            InputEvent::Status(addr) => return Ok(Outcome::Status(addr)),
        }
        Ok(Outcome::Nothing)
    }

    /// Builds the new scene's rig and layers here (they allocate), then hands them over.
    /// Loads the scene file again and switches to it (SIGHUP); on any error the old scene
    /// plays on and the error says why.
    /// The file reloaded is the one of the scene that plays, which OSC may have changed since
    /// the start. The file is taken as it is: a tempo or volume sent over OSC is forgotten for
    /// the file's own.
    pub fn reload(&mut self) -> Result<ComposerMsg, SessionError> {
        let path = self.scene.path.clone();
        let scene = Scene::load(&path)?;
        // Forgotten before the switch, which builds the new rig with them; kept if it fails.
        let operator = self.control.forget_operator();
        let msg = self
            .switch_scene(scene)
            .inspect_err(|_| self.control.restore_operator(operator))?;
        tracing::info!("SIGHUP: reloaded {}", path.display());
        Ok(msg)
    }

    pub fn switch_scene(&mut self, scene: Scene) -> Result<ComposerMsg, SessionError> {
        let decoded = Layers::decode(&scene)?;
        self.layers.play(&scene, decoded)?;
        let (rig, handle) = Rig::build(&scene, self.sample_rate);
        self.send(Command::SwapRig(Box::new(rig)));
        self.rig = handle;
        self.control.switch_scene(&scene);
        let controls = self.control.tick(0.0);
        self.rig.apply(&controls);
        let generator = new_generator(&scene, &controls, self.seed);
        tracing::info!(scene = %scene.name, source = generator.source_name(), "scene changed");
        let lookahead = scene.generator.lookahead;
        self.scene = scene;
        Ok(ComposerMsg::Replace {
            composition: Composition::Generated(Box::new(generator)),
            lookahead,
        })
    }

    /// Advances the control loop by `dt` seconds: applies due scheduled inputs, moves the rig's
    /// parameters, and returns the controls for the composer.
    /// Follows the scene's opening hours at local `minute` after midnight: the volume fades over
    /// the scene's `fade` seconds towards silence (or a quarter) when it closes, and back when
    /// it opens. The first look sets the level at once, so a box booted at night starts quiet.
    /// Live only: an offline render has no wall clock.
    pub fn follow_hours(&mut self, minute: u32, dt: f32) {
        let Some(hours) = self.scene.hours else {
            self.control.hours_gain = 1.0;
            self.hours_open = None;
            return;
        };
        let open = hours.is_open(minute);
        let target = hours.gain_at(minute);
        if self.hours_open != Some(open) {
            let hhmm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
            let span = format!("{}-{}", hhmm(hours.open), hhmm(hours.close));
            if open {
                tracing::info!("opening hours {span}: open at {}", hhmm(minute));
            } else {
                tracing::info!(
                    "opening hours {span}: closed at {}; {:?} until {}",
                    hhmm(minute),
                    hours.outside,
                    hhmm(hours.open)
                );
            }
        }
        let first = self.hours_open.is_none();
        self.hours_open = Some(open);
        let gain = &mut self.control.hours_gain;
        if first {
            *gain = target;
        } else {
            let step = dt / hours.fade;
            *gain += (target - *gain).clamp(-step, step);
        }
    }

    /// Each timed input that fell due comes back with its outcome, or its error: one that fails
    /// (a scene that does not load) leaves the scene as it is and the inputs after it applied.
    pub fn tick(&mut self, dt: f32) -> (ComposerMsg, Vec<Result<Outcome, SessionError>>) {
        let now = self.now_sample();
        let mut outcomes = Vec::new();
        if !self.scheduled.is_empty() {
            let (mut ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.scheduled)
                .into_iter()
                .partition(|(s, ev)| self.due_at(*s, ev) <= now);
            self.scheduled = later;
            ready.sort_by_key(|(s, _)| *s);
            for (s, ev) in ready {
                outcomes.push(self.apply(ev, Some(s)));
            }
        }
        self.flush();
        while self.garbage.pop().is_ok() {}
        let controls = self.control.tick(dt);
        self.rig.apply(&controls);
        if (self.tempo.get() - controls.tempo).abs() > 1e-9 {
            self.tempo.set(controls.tempo);
            self.tempo_log.push((self.telemetry.beat(), controls.tempo));
        }
        self.layers.apply(&controls.layer_level);
        let params = sampling(&controls, &self.scene);
        self.last_controls = Some(controls.clone());
        (ComposerMsg::Controls { controls, params }, outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Conditioning;

    fn generated(seed: u64) -> Composition {
        let cond = Conditioning {
            density: None,
            register: None,
            major: None,
            styles: vec![],
            tonic: None,
        };
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
        };
        let source = Box::new(RuleSource::new(0, true, seed));
        let g = Generator::new(source, 0, true, seed, cond, params, 0.7);
        Composition::Generated(Box::new(g))
    }

    /// The rule-based source, under another name, whose rollbacks fail.
    struct NoRollback(RuleSource);
    impl NoteSource for NoRollback {
        fn name(&self) -> &str {
            "no-rollback"
        }
        fn position(&self) -> u64 {
            self.0.position()
        }
        fn next_step(
            &mut self,
            c: &Conditioning,
            p: &SamplingParams,
        ) -> Result<crate::gen::Step, crate::gen::SourceError> {
            self.0.next_step(c, p)
        }
        fn rollback(&mut self, _: u64) -> Result<(), crate::gen::SourceError> {
            Err(crate::gen::SourceError::Failed {
                source_name: "no-rollback".into(),
                message: "no history".into(),
            })
        }
        fn start_at(&mut self, step: u64) {
            self.0.start_at(step)
        }
    }

    #[test]
    fn a_source_that_fails_on_new_controls_is_reported_replaced() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
        };
        let cond = |density| Conditioning {
            density: Some(density),
            register: None,
            major: None,
            styles: vec![],
            tonic: None,
        };
        let source = Box::new(NoRollback(RuleSource::new(0, true, 3)));
        let g = Generator::new(source, 0, true, 3, cond(2.0), params, 0.7).with_decode_ahead(4);
        let (notes, _rx) = rtrb::RingBuffer::new(256);
        let mut c = Composer::new(Composition::Generated(Box::new(g)), notes, 0.5);
        // Steps decoded ahead, which the new controls roll back: the source fails there.
        c.fill(0.0);
        assert_eq!(*c.source_name.lock().unwrap(), "no-rollback");
        let controls = Controls {
            cond: cond(6.0),
            tempo: 120.0,
            volume: 1.0,
            reverb: 0.0,
            velocity: 0.7,
            temperature: 1.0,
            cutoff: vec![],
            gain_db: vec![],
            layer_level: vec![],
        };
        c.handle(ComposerMsg::Controls { controls, params }, 0.0);
        assert_eq!(c.generator().unwrap().stats().fallbacks, 1);
        assert_eq!(*c.source_name.lock().unwrap(), "rules");
    }

    #[test]
    fn live_the_next_scenes_composer_is_watched_too() {
        for live in [false, true] {
            let (notes, _rx) = rtrb::RingBuffer::new(256);
            let mut c = Composer::new(generated(1), notes, 0.5);
            if live {
                c.watch_pace();
            }
            assert_eq!(c.generator().unwrap().watches_pace(), live);
            c.handle(
                ComposerMsg::Replace {
                    composition: generated(2),
                    lookahead: 0.5,
                },
                4.0,
            );
            assert_eq!(c.generator().unwrap().watches_pace(), live, "live {live}");
        }
    }

    /// Two OSC bundles timed for the same sample: a scene change to a file that does not exist,
    /// then one to a scene that does. The first is an error and the second still switches.
    #[test]
    fn a_timed_input_that_fails_leaves_the_inputs_due_with_it() {
        let Parts {
            mut engine,
            mut conductor,
            ..
        } = test_parts(test_scene("night"), 1);
        let at = 2_048;
        for name in ["no-such-scene", "gallery"] {
            let ev = TimedEvent {
                when: When::Sample(at),
                event: InputEvent::Scene(name.into()),
            };
            assert!(matches!(conductor.handle(ev), Ok(Outcome::Nothing)));
        }
        let mut out = vec![0f32; 256 * 2];
        let mut due = Vec::new();
        while due.is_empty() {
            assert!(conductor.now_sample() <= at, "the inputs fell due by {at}");
            engine.process(&mut out, 2);
            due = conductor.tick(256.0 / 48_000.0).1;
        }
        assert_eq!(due.len(), 2);
        match &due[0] {
            Err(e) => assert!(e.to_string().contains("no-such-scene"), "{e}"),
            Ok(_) => panic!("a scene that does not exist was switched to"),
        }
        assert!(matches!(due[1], Ok(Outcome::Composer(_))));
        assert_eq!(conductor.scene.name, "gallery");
    }

    /// Whatever the old scene's composer committed ahead of the playhead still sounds when due
    /// (the audio thread holds it), so the notes it leaves sounding must end after they begin,
    /// not at the playhead, before some of them have started: a note begun after its own end
    /// would sound on the new scene's instruments until a voice was stolen.
    #[test]
    fn a_scene_change_ends_every_note_the_old_composer_began() {
        for seed in 0..8 {
            let (notes, mut rx) = rtrb::RingBuffer::new(4096);
            let mut c = Composer::new(generated(seed), notes, 0.75);
            // Each event as the audio thread plays it: at its beat, or on arrival if that is later.
            let mut fired: Vec<(f64, NoteEvent)> = Vec::new();
            let mut drain = |playhead: f64, fired: &mut Vec<(f64, NoteEvent)>| {
                while let Ok(e) = rx.pop() {
                    fired.push((e.beat.max(playhead), e));
                }
            };
            let change = 7.3 + seed as f64 * 0.37;
            let mut playhead = 0.0;
            while playhead < change {
                c.fill(playhead);
                drain(playhead, &mut fired);
                playhead += 0.05;
            }
            c.handle(
                ComposerMsg::Replace {
                    composition: generated(seed + 100),
                    lookahead: 0.75,
                },
                playhead,
            );
            drain(playhead, &mut fired);
            let released = fired.iter().map(|(_, e)| e.beat).fold(0.0, f64::max);
            // The new piece begins where the old one's notes end.
            let before = fired.len();
            for _ in 0..40 {
                playhead += 0.05;
                c.fill(playhead);
                drain(playhead, &mut fired);
            }
            let new = &fired[before..];
            assert!(
                new.iter().any(|(_, e)| e.on),
                "seed {seed}: the new piece plays"
            );
            assert!(
                new.iter().all(|(_, e)| e.beat >= released),
                "seed {seed}: the new piece begins before beat {released}"
            );
            fired.truncate(before);
            fired.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut sounding = std::collections::HashSet::new();
            for (_, e) in &fired {
                if e.on {
                    sounding.insert((e.voice, e.pitch));
                } else {
                    sounding.remove(&(e.voice, e.pitch));
                }
            }
            assert!(
                sounding.is_empty(),
                "seed {seed}: left sounding after the change at beat {playhead:.2}: {sounding:?}"
            );
        }
    }

    /// An engine started on a scene without sample layers plays the layers of the scene it
    /// switches to.
    #[test]
    fn layers_play_after_a_start_without_any() {
        let performer = test_scene("performer");
        assert!(performer.layers.is_empty());
        let Parts { mut conductor, .. } = test_parts(performer, 1);
        let gallery = test_scene("gallery");
        let layers = gallery.layers.len();
        assert!(layers > 0);
        assert!(conductor.switch_scene(gallery).is_ok());
        assert_eq!(conductor.layers.playing(), layers);
    }
}
