//! `play --inputs`: a logged night replayed on the device, sample for sample what `render` makes
//! of the same log and seed. The live engine applies inputs at its next control tick, as they
//! arrive; a replay knows them all in advance, so it runs the renderer's lockstep (conductor,
//! composer, audio engine, one block at a time) on a thread of its own, a few blocks ahead of
//! the device, and the device's callback only copies those blocks out of a wait-free ring.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::audio::Telemetry;
use crate::input::TimedEvent;
use crate::output::Render;
use crate::render::{Lockstep, BLOCK};
use crate::session::{self, Outcome};

/// Blocks rendered ahead of the device: 43 ms at 48 kHz, enough to ride out the renderer
/// thread's scheduling on a busy box, small enough that live status replies stay current.
const AHEAD_BLOCKS: usize = 8;

/// The device side: copies rendered frames out, never waits. An empty ring while the renderer
/// still runs is an underrun, counted with the xruns.
pub struct RingPlayer {
    frames: rtrb::Consumer<f32>,
    telemetry: Arc<Telemetry>,
    finished: Arc<AtomicBool>,
}

impl Render for RingPlayer {
    fn process(&mut self, data: &mut [f32], channels: usize) {
        let channels = channels.max(1);
        let wanted = data.len() / channels;
        let have = self.frames.slots() / 2;
        let n = wanted.min(have);
        if let Ok(chunk) = self.frames.read_chunk(n * 2) {
            let (a, b) = chunk.as_slices();
            for (i, frame) in a.chunks_exact(2).chain(b.chunks_exact(2)).enumerate() {
                let out = &mut data[i * channels..(i + 1) * channels];
                match channels {
                    1 => out[0] = 0.5 * (frame[0] + frame[1]),
                    _ => {
                        out[0] = frame[0];
                        out[1] = frame[1];
                        out[2..].fill(0.0);
                    }
                }
            }
            chunk.commit_all();
        }
        data[n * channels..].fill(0.0);
        if n < wanted && !self.finished.load(Relaxed) {
            self.telemetry.xruns.fetch_add(1, Relaxed);
        }
    }
}

/// What the renderer thread is told by the rest of `play`.
pub enum ReplayMsg {
    Command(crate::audio::Command),
    /// SIGHUP: load the scene file again and switch to it (or keep playing the old one).
    Reload,
    Stop,
}

pub struct Replay {
    pub player: RingPlayer,
    pub thread: JoinHandle<Lockstep>,
}

/// Starts the renderer thread. Live OSC that arrives during a replay (`inputs`) is applied at
/// the block being rendered, which no log can reproduce. `hook` runs on the renderer thread with
/// the conductor in hand: with each outcome that is not for the composer (status requests), and
/// with `None` about once a millisecond (the watchdog).
pub fn start(
    mut step: Lockstep,
    inputs: Receiver<TimedEvent>,
    messages: Receiver<ReplayMsg>,
    mut hook: impl FnMut(&Lockstep, Option<Outcome>) + Send + 'static,
) -> std::io::Result<Replay> {
    let telemetry = step.conductor.telemetry.clone();
    let (mut tx, rx) = rtrb::RingBuffer::<f32>::new(AHEAD_BLOCKS * BLOCK * 2);
    let finished = Arc::new(AtomicBool::new(false));
    let done = finished.clone();
    let thread = std::thread::Builder::new()
        .name("replay".into())
        .spawn(move || {
            let mut block = vec![0f32; BLOCK * 2];
            let panic_at = crate::play::test_panic_at();
            'run: loop {
                if panic_at.is_some_and(|t| std::time::Instant::now() >= t) {
                    panic!("{} is set: the replay panics", crate::play::PANIC_AFTER_ENV);
                }
                while let Ok(msg) = messages.try_recv() {
                    match msg {
                        ReplayMsg::Stop => break 'run,
                        ReplayMsg::Command(c) => step.conductor.send(c),
                        ReplayMsg::Reload => match step.conductor.reload() {
                            Ok(m) => step.to_composer(m),
                            Err(e) => session::log_scene_kept(&format_args!("SIGHUP: {e}")),
                        },
                    }
                }
                while let Ok(ev) = inputs.try_recv() {
                    match step.apply(ev) {
                        Ok(Outcome::Nothing) => {}
                        Ok(other) => hook(&step, Some(other)),
                        Err(e) => session::log_scene_kept(&e),
                    }
                }
                hook(&step, None);
                while tx.slots() >= block.len() {
                    for o in step.block(&mut block) {
                        hook(&step, Some(o));
                    }
                    if let Ok(chunk) = tx.write_chunk_uninit(block.len()) {
                        chunk.fill_from_iter(block.iter().copied());
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            done.store(true, Relaxed);
            step
        })?;
    Ok(Replay {
        player: RingPlayer {
            frames: rx,
            telemetry,
            finished,
        },
        thread,
    })
}
