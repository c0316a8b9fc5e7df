//! Sample layers (ambient beds) through kira. kira's own cpal backend would open a second
//! stream; instead a backend of ours hands kira's `Renderer` to our callback, which mixes it
//! into the one stream under the same clock (and, offline, the same virtual clock).

use std::time::Duration;

use kira::backend::{Backend, Renderer};
use kira::sound::static_sound::{StaticSoundData, StaticSoundHandle};
use kira::sound::PlaybackState;
use kira::{AudioManager, AudioManagerSettings, Decibels, Tween};

use super::engine::LayerRenderer;
use crate::scene::Scene;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {name:?}: sample {path} cannot be decoded: {message}")]
    Decode {
        name: String,
        path: std::path::PathBuf,
        message: String,
    },
    #[error("layer {name:?}: kira cannot play it: {message}")]
    Play { name: String, message: String },
    #[error("the sample-layer mixer could not start: {0}")]
    Start(String),
}

/// A kira backend that passes the renderer to whoever owns the audio callback.
pub struct HandOff {
    tx: crossbeam_channel::Sender<Renderer>,
}

pub struct HandOffSettings {
    pub sample_rate: u32,
    pub tx: crossbeam_channel::Sender<Renderer>,
}

impl Backend for HandOff {
    type Settings = HandOffSettings;
    type Error = LayerError;

    fn setup(settings: Self::Settings, _buffer: usize) -> Result<(Self, u32), Self::Error> {
        Ok((HandOff { tx: settings.tx }, settings.sample_rate))
    }

    fn start(&mut self, renderer: Renderer) -> Result<(), Self::Error> {
        self.tx
            .send(renderer)
            .map_err(|_| LayerError::Start("renderer receiver is gone".into()))
    }
}

struct KiraRenderer(Renderer);

impl LayerRenderer for KiraRenderer {
    fn start_block(&mut self) {
        self.0.on_start_processing();
    }

    fn render(&mut self, out: &mut [f32]) {
        // kira overwrites and clamps what it is given; the engine sums it with the voices.
        self.0.process(out, 2);
    }
}

struct Playing {
    handle: StaticSoundHandle,
    gain_db: f32,
    level: f32,
}

/// The control thread's side of the sample layers.
pub struct Layers {
    manager: AudioManager<HandOff>,
    playing: Vec<Playing>,
}

fn tween(seconds: f32) -> Tween {
    Tween {
        duration: Duration::from_secs_f32(seconds.max(0.0)),
        ..Default::default()
    }
}

impl Layers {
    /// Starts kira and returns the renderer half for the audio callback.
    pub fn new(sample_rate: u32) -> Result<(Layers, Box<dyn LayerRenderer>), LayerError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let manager = AudioManager::<HandOff>::new(AudioManagerSettings {
            capacities: Default::default(),
            main_track_builder: Default::default(),
            internal_buffer_size: 128,
            backend_settings: HandOffSettings { sample_rate, tx },
        })?;
        let renderer = rx
            .try_recv()
            .map_err(|_| LayerError::Start("kira did not hand over its renderer".into()))?;
        Ok((
            Layers {
                manager,
                playing: Vec::new(),
            },
            Box::new(KiraRenderer(renderer)),
        ))
    }

    /// Decodes a scene's layers (the slow part, done before anything changes).
    pub fn decode(scene: &Scene) -> Result<Vec<(StaticSoundData, f32, f32)>, LayerError> {
        scene
            .layers
            .iter()
            .map(|l| {
                let data = StaticSoundData::from_file(&l.file).map_err(|e| LayerError::Decode {
                    name: l.name.clone(),
                    path: l.file.clone(),
                    message: e.to_string(),
                })?;
                let data = if l.looped { data.loop_region(..) } else { data };
                Ok((data, l.gain_db, l.fade))
            })
            .collect()
    }

    /// Fades out what plays and fades in the new scene's layers.
    pub fn play(
        &mut self,
        scene: &Scene,
        decoded: Vec<(StaticSoundData, f32, f32)>,
    ) -> Result<(), LayerError> {
        for mut p in self.playing.drain(..) {
            p.handle.stop(tween(2.0));
        }
        for (layer, (data, gain_db, fade)) in scene.layers.iter().zip(decoded) {
            let data = data
                .volume(Decibels(gain_db))
                .fade_in_tween(Some(tween(fade)));
            let handle = self.manager.play(data).map_err(|e| LayerError::Play {
                name: layer.name.clone(),
                message: e.to_string(),
            })?;
            self.playing.push(Playing {
                handle,
                gain_db,
                level: 1.0,
            });
        }
        Ok(())
    }

    /// Follows the controls' layer levels (0..1 of each layer's scene gain).
    pub fn apply(&mut self, levels: &[f32]) {
        for (p, &level) in self.playing.iter_mut().zip(levels) {
            if (p.level - level).abs() > 0.01 {
                p.level = level;
                let db = if level <= 0.001 {
                    Decibels::SILENCE.0
                } else {
                    p.gain_db + 20.0 * level.log10()
                };
                p.handle.set_volume(Decibels(db), tween(0.1));
            }
        }
    }

    pub fn playing(&self) -> usize {
        self.playing
            .iter()
            .filter(|p| p.handle.state() != PlaybackState::Stopped)
            .count()
    }
}
