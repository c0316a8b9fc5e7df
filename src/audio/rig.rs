//! A `Rig` is one scene's sound: its instruments' voice pools, their routing, and the master
//! section. It is built on the control thread (it allocates) and sent whole to the audio thread;
//! the old one is sent back to be dropped there. The `RigHandle` stays behind and moves the
//! rig's parameters through atomics.

use fundsp::prelude32::*;

use super::instrument::master_unit;
use super::voices::VoicePool;
use crate::control::Controls;
use crate::scene::Scene;

/// The tag of notes played by the performer (`/roomscore/note`); 0..4 are the model's voices.
pub const PERFORMER: u8 = 4;

pub struct Rig {
    pub(super) pools: Vec<VoicePool>,
    gain_target: Vec<Shared>,
    gain_now: Vec<f32>,
    /// For each tag (4 voices + performer), a bit per instrument that plays it.
    routes: [u64; 5],
    master: Box<dyn AudioUnit>,
    mix: BufferArray<U2>,
    out: BufferArray<U2>,
    pub(super) performer_hold: u64,
    /// Samples between a note's start and its sound at the output: the limiter's lookahead.
    pub(super) output_delay: u32,
}

/// The control thread's side of a rig: its parameters.
#[derive(Clone)]
pub struct RigHandle {
    cutoff: Vec<Shared>,
    gain_db: Vec<Shared>,
    reverb: Shared,
    volume: Shared,
}

fn db_to_gain(db: f32) -> f32 {
    10f32.powf(db / 20.0)
}

impl Rig {
    pub fn build(scene: &Scene, sample_rate: f32) -> (Rig, RigHandle) {
        let cutoff: Vec<Shared> = scene.instruments.iter().map(|i| shared(i.cutoff)).collect();
        let gain_db: Vec<Shared> = scene
            .instruments
            .iter()
            .map(|i| shared(i.gain_db))
            .collect();
        let reverb = shared(scene.master.reverb);
        let volume = shared(scene.master.volume);
        let pools = scene
            .instruments
            .iter()
            .zip(&cutoff)
            .map(|(inst, c)| VoicePool::new(inst, c, sample_rate))
            .collect();
        let mut master = master_unit(&scene.master, &reverb, &volume, sample_rate);
        let output_delay = master.latency().unwrap_or(0.0).round().max(0.0) as u32;
        let mut routes = [0u64; 5];
        for (i, inst) in scene.instruments.iter().enumerate() {
            for v in &inst.voices {
                routes[v.index()] |= 1 << i;
            }
        }
        routes[PERFORMER as usize] = 1 << scene.performer_index();
        let rig = Rig {
            pools,
            gain_now: scene
                .instruments
                .iter()
                .map(|i| db_to_gain(i.gain_db))
                .collect(),
            gain_target: gain_db.clone(),
            routes,
            master,
            mix: BufferArray::new(),
            out: BufferArray::new(),
            performer_hold: (scene.master.performer_hold * sample_rate) as u64,
            output_delay,
        };
        (
            rig,
            RigHandle {
                cutoff,
                gain_db,
                reverb,
                volume,
            },
        )
    }

    /// Routes a note to every instrument that plays its tag. Returns voices stolen.
    pub fn note(&mut self, tag: u8, pitch: u8, velocity: f32, on: bool, now: u64) -> u64 {
        let mut stolen = 0;
        let routes = self.routes.get(tag as usize).copied().unwrap_or(0);
        let hold = (tag == PERFORMER).then(|| now + self.performer_hold);
        for (i, pool) in self.pools.iter_mut().enumerate() {
            if routes & (1 << i) == 0 {
                continue;
            }
            if on {
                stolen += pool.note_on(tag, pitch, velocity, hold) as u64;
            } else {
                pool.note_off(tag, pitch);
            }
        }
        stolen
    }

    pub fn release_all(&mut self) {
        for p in &mut self.pools {
            p.release_all();
        }
    }

    pub fn active_voices(&self) -> usize {
        self.pools.iter().map(VoicePool::active).sum()
    }

    /// Renders `n` (at most 64) samples: voices, plus `extra` (the sample layers), through the
    /// master section, into `left`/`right` (overwritten).
    pub fn render(
        &mut self,
        n: usize,
        now: u64,
        extra_l: &[f32],
        extra_r: &[f32],
        left: &mut [f32],
        right: &mut [f32],
    ) {
        self.mix.clear();
        for (i, pool) in self.pools.iter_mut().enumerate() {
            // Instrument gain moves by at most a step per span, so a mapping never zips.
            let target = db_to_gain(self.gain_target[i].value());
            let g = &mut self.gain_now[i];
            *g += (target - *g) * 0.05;
            let gain = *g;
            let (l, r) = split_two(&mut self.mix);
            pool.render(n, now, gain, l, r);
        }
        {
            let (l, r) = split_two(&mut self.mix);
            for i in 0..n {
                l[i] += extra_l[i];
                r[i] += extra_r[i];
            }
        }
        self.master
            .process(n, &self.mix.buffer_ref(), &mut self.out.buffer_mut());
        left[..n].copy_from_slice(&self.out.channel_f32(0)[..n]);
        right[..n].copy_from_slice(&self.out.channel_f32(1)[..n]);
    }
}

/// Both channels of a stereo buffer, borrowed together.
fn split_two(buf: &mut BufferArray<U2>) -> (&mut [f32], &mut [f32]) {
    let mut b = buf.buffer_mut();
    let l = b.channel_f32_mut(0);
    let r = b.channel_f32_mut(1);
    (l, r)
}

impl RigHandle {
    /// Moves the rig's parameters to the controls; the graph smooths them.
    pub fn apply(&self, c: &Controls) {
        for (s, v) in self.cutoff.iter().zip(&c.cutoff) {
            s.set(*v);
        }
        for (s, v) in self.gain_db.iter().zip(&c.gain_db) {
            s.set(*v);
        }
        self.reverb.set(c.reverb);
        self.volume.set(c.volume);
    }
}
