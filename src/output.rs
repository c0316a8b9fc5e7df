//! Where the engine's samples go: a cpal stream (ALSA or JACK), or the null output, which calls
//! the engine at the same pace with no device, so a kiosk whose card is missing keeps answering.
//! Either way the callback only `try_lock`s the engine, which never waits: the lock exists only
//! so the engine can move between outputs when a device comes or goes.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};

use crate::audio::{AudioEngine, Telemetry};

#[cfg(target_os = "linux")]
mod alsa_log;
mod supervisor;
#[cfg(target_os = "linux")]
pub use alsa_log::AlsaErrors;

/// Elsewhere there is no alsa-lib to quiet.
#[cfg(not(target_os = "linux"))]
pub struct AlsaErrors;

#[cfg(not(target_os = "linux"))]
impl AlsaErrors {
    pub fn capture() -> Self {
        AlsaErrors
    }

    pub fn drain(&mut self) {}
}
pub use supervisor::{find_at_start, open_at_start, AtStart, Found, Supervisor, Unanswered};

/// What an output's callback runs: the audio engine, or a replay's ring of rendered blocks.
pub trait Render: Send {
    /// Fills `data` (interleaved, `channels` wide). Runs on the audio thread: no allocation,
    /// no locks, no waiting.
    fn process(&mut self, data: &mut [f32], channels: usize);
}

impl Render for AudioEngine {
    fn process(&mut self, data: &mut [f32], channels: usize) {
        AudioEngine::process(self, data, channels)
    }
}

pub type SharedEngine = Arc<Mutex<dyn Render>>;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("audio host {0:?} is not available (hosts here: {1})")]
    NoHost(String, String),
    #[error("no audio output device{}", .0.as_deref().map(|n| format!(" named {n:?}")).unwrap_or_default())]
    NoDevice(Option<String>),
    #[error("audio device {device:?}: {message}")]
    Device { device: String, message: String },
    /// A device found again while playing, at another rate than the graph was built for.
    #[error(
        "audio device {device:?} offers {offered} Hz, and the engine runs at {running} Hz; \
         restart the engine to play on it"
    )]
    OtherRate {
        device: String,
        offered: u32,
        running: u32,
    },
}

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct OutputRequest {
    /// `None` for the host's default device.
    pub device: Option<String>,
    /// `alsa` or `jack`; `None` for cpal's default host.
    pub host: Option<String>,
    pub buffer: u32,
    pub sample_rate: Option<u32>,
}

/// A device and a configuration it accepts.
pub struct Negotiated {
    device: cpal::Device,
    config: cpal::StreamConfig,
    format: cpal::SampleFormat,
    pub sample_rate: u32,
    pub channels: u16,
    pub host: String,
    pub name: String,
}

fn host_for(name: Option<&str>) -> Result<cpal::Host, OutputError> {
    let Some(name) = name else {
        return Ok(cpal::default_host());
    };
    let available = cpal::available_hosts();
    let id = available
        .iter()
        .find(|h| h.name().eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| {
            OutputError::NoHost(
                name.to_string(),
                available
                    .iter()
                    .map(|h| h.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?;
    cpal::host_from_id(id).map_err(|e| OutputError::NoHost(name.to_string(), e.to_string()))
}

fn device_name(d: &cpal::Device) -> String {
    d.description()
        .map(|d| d.name().to_string())
        .unwrap_or_else(|_| "<unnamed>".into())
}

/// Finds the device and a stereo (or whatever it has) f32/i16 configuration at the rate asked.
/// It can hang with the device: only on a device thread (`supervisor`).
fn negotiate(req: &OutputRequest) -> Result<Negotiated, OutputError> {
    let host = host_for(req.host.as_deref())?;
    let device = match req.device.as_deref() {
        None | Some("default") => host.default_output_device(),
        Some(name) => host
            .output_devices()
            .map_err(|e| OutputError::Device {
                device: name.into(),
                message: e.to_string(),
            })?
            .find(|d| device_name(d) == name || device_name(d).contains(name)),
    }
    .ok_or_else(|| OutputError::NoDevice(req.device.clone()))?;
    let name = device_name(&device);
    let dev_err = |e: &dyn std::fmt::Display| OutputError::Device {
        device: name.clone(),
        message: e.to_string(),
    };
    let default = device.default_output_config().map_err(|e| dev_err(&e))?;
    let want_rate = req.sample_rate.unwrap_or(48_000);
    let mut best: Option<(cpal::SampleFormat, u16, u32)> = None;
    for range in device.supported_output_configs().map_err(|e| dev_err(&e))? {
        let format = range.sample_format();
        if !matches!(format, cpal::SampleFormat::F32 | cpal::SampleFormat::I16) {
            continue;
        }
        let rate = want_rate.clamp(range.min_sample_rate(), range.max_sample_rate());
        let score = |f: cpal::SampleFormat, ch: u16, r: u32| {
            (r == want_rate) as u8 * 4 + (f == cpal::SampleFormat::F32) as u8 * 2 + (ch == 2) as u8
        };
        let cand = (format, range.channels(), rate);
        if best.is_none_or(|b| score(cand.0, cand.1, cand.2) > score(b.0, b.1, b.2)) {
            best = Some(cand);
        }
    }
    let (format, channels, sample_rate) = best.unwrap_or((
        default.sample_format(),
        default.channels(),
        default.sample_rate(),
    ));
    Ok(Negotiated {
        config: cpal::StreamConfig {
            channels,
            sample_rate,
            buffer_size: cpal::BufferSize::Fixed(req.buffer),
        },
        device,
        format,
        sample_rate,
        channels,
        host: host.id().name().to_string(),
        name,
    })
}

/// The callback body shared by every output: run the engine if it is free, and account.
#[inline]
fn callback(
    engine: &SharedEngine,
    data: &mut [f32],
    channels: usize,
    telemetry: &Telemetry,
    sample_rate: f32,
    plays_at: crate::clock::PlaysAt,
) {
    let started = Instant::now();
    telemetry.anchor.store(
        telemetry.sample_clock.load(Relaxed),
        plays_at,
        sample_rate as f64,
    );
    match engine.try_lock() {
        Ok(mut e) => {
            #[cfg(feature = "rt-check")]
            assert_no_alloc::assert_no_alloc(|| e.process(data, channels));
            #[cfg(not(feature = "rt-check"))]
            e.process(data, channels);
        }
        Err(_) => {
            data.fill(0.0);
            telemetry.busy_callbacks.fetch_add(1, Relaxed);
        }
    }
    let frames = data.len() / channels.max(1);
    let period = frames as f64 / sample_rate as f64;
    if period > 0.0 {
        let ppm = (started.elapsed().as_secs_f64() / period * 1e6) as u32;
        telemetry.load_ppm.store(ppm, Relaxed);
        telemetry.load_max_ppm.fetch_max(ppm, Relaxed);
    }
}

/// When the buffer of this callback reaches the output, and on which clock.
fn host_playback_ns(info: &cpal::OutputCallbackInfo) -> crate::clock::PlaysAt {
    let t = info.timestamp();
    crate::clock::playback_time(t.callback.as_nanos() as u64, t.playback.as_nanos() as u64)
}

/// A playing output. Dropping it stops the sound.
pub enum Output {
    Cpal {
        stream: cpal::Stream,
        lost: Arc<AtomicBool>,
        /// What the host said when it gave up on the device.
        reason: Arc<Mutex<Option<String>>>,
        description: String,
    },
    Null(NullOutput),
}

impl Output {
    pub fn describe(&self) -> String {
        match self {
            Output::Cpal { description, .. } => description.clone(),
            Output::Null(n) => format!("null output, {} frames at {} Hz", n.frames, n.sample_rate),
        }
    }

    /// Whether the device reported itself gone.
    pub fn is_lost(&self) -> bool {
        match self {
            Output::Cpal { lost, .. } => lost.load(Relaxed),
            Output::Null(_) => false,
        }
    }

    /// Starts a device's stream; the null output plays from its start.
    pub fn play(&self) -> Result<(), OutputError> {
        match self {
            Output::Cpal {
                stream,
                description,
                ..
            } => stream.play().map_err(|e| OutputError::Device {
                device: description.clone(),
                message: e.to_string(),
            }),
            Output::Null(_) => Ok(()),
        }
    }

    pub fn lost_reason(&self) -> Option<String> {
        match self {
            Output::Cpal { reason, .. } => reason.lock().ok().and_then(|r| r.clone()),
            Output::Null(_) => None,
        }
    }
}

/// Opens the device, not yet playing (`Output::play`). It can hang with the device: only on a
/// device thread (`supervisor`).
fn build_cpal(
    neg: &Negotiated,
    engine: SharedEngine,
    telemetry: Arc<Telemetry>,
) -> Result<Output, OutputError> {
    let lost = Arc::new(AtomicBool::new(false));
    let channels = neg.channels as usize;
    let sr = neg.sample_rate as f32;
    let err_tel = telemetry.clone();
    let err_lost = lost.clone();
    let reason = Arc::new(Mutex::new(None));
    let err_reason = reason.clone();
    // Hosts call this from their own threads, not from inside the audio callback.
    let on_error = move |e: cpal::Error| match e.kind() {
        cpal::ErrorKind::Xrun => {
            err_tel.xruns.fetch_add(1, Relaxed);
        }
        cpal::ErrorKind::DeviceChanged | cpal::ErrorKind::RealtimeDenied => {}
        _ => {
            if let Ok(mut r) = err_reason.lock() {
                r.get_or_insert_with(|| e.to_string());
            }
            err_lost.store(true, Relaxed);
        }
    };
    let dev_err = |e: cpal::Error| OutputError::Device {
        device: neg.name.clone(),
        message: e.to_string(),
    };
    let stream = match neg.format {
        cpal::SampleFormat::I16 => {
            let mut scratch = vec![0f32; 16_384 * channels];
            neg.device
                .build_output_stream::<i16, _, _>(
                    neg.config,
                    move |data: &mut [i16], info: &cpal::OutputCallbackInfo| {
                        let n = data.len().min(scratch.len());
                        let at = host_playback_ns(info);
                        callback(&engine, &mut scratch[..n], channels, &telemetry, sr, at);
                        for (o, s) in data.iter_mut().zip(&scratch[..n]) {
                            *o = (s * 32767.0) as i16;
                        }
                    },
                    on_error,
                    None,
                )
                .map_err(dev_err)?
        }
        _ => neg
            .device
            .build_output_stream::<f32, _, _>(
                neg.config,
                move |data: &mut [f32], info: &cpal::OutputCallbackInfo| {
                    let at = host_playback_ns(info);
                    callback(&engine, data, channels, &telemetry, sr, at)
                },
                on_error,
                None,
            )
            .map_err(dev_err)?,
    };
    Ok(Output::Cpal {
        stream,
        lost,
        reason,
        description: format!(
            "{} device {:?}, {} ch, {} Hz, {} frames, {:?}",
            neg.host,
            neg.name,
            neg.channels,
            neg.sample_rate,
            match neg.config.buffer_size {
                cpal::BufferSize::Fixed(n) => n,
                cpal::BufferSize::Default => 0,
            },
            neg.format
        ),
    })
}

/// Calls the engine on a timer, in real time, with nowhere for the samples to go.
pub struct NullOutput {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub frames: u32,
    pub sample_rate: u32,
}

impl NullOutput {
    pub fn start(
        engine: SharedEngine,
        telemetry: Arc<Telemetry>,
        sample_rate: u32,
        frames: u32,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("null-output".into())
            .spawn(move || {
                let mut buf = vec![0f32; frames as usize * 2];
                let period = Duration::from_secs_f64(frames as f64 / sample_rate as f64);
                let mut deadline = Instant::now();
                while !stop2.load(Relaxed) {
                    let at = crate::clock::PlaysAt::now(crate::clock::Timebase::Monotonic);
                    callback(&engine, &mut buf, 2, &telemetry, sample_rate as f32, at);
                    deadline += period;
                    let now = Instant::now();
                    if deadline > now {
                        std::thread::sleep(deadline - now);
                    } else if now - deadline > period * 4 {
                        // Fell far behind (the machine stalled): count it and catch up.
                        telemetry.xruns.fetch_add(1, Relaxed);
                        deadline = now;
                    }
                }
            })
            .expect("spawn null output thread");
        NullOutput {
            stop,
            thread: Some(thread),
            frames,
            sample_rate,
        }
    }
}

impl Drop for NullOutput {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Prints every host and its output devices. Each host is listed on a thread of its own and
/// waited for at most `LIST_WAIT`: a JACK server that hangs holds its host's calls for good,
/// and this is what an operator runs when the room is quiet.
pub fn list_devices() -> anyhow::Result<()> {
    let default_host = cpal::default_host().id();
    for id in cpal::available_hosts() {
        let mark = if id == default_host { " (default)" } else { "" };
        println!("host {}{mark}", id.name());
        let listing = std::thread::Builder::new()
            .name("audio-device".into())
            .spawn(move || host_devices(id));
        let listing = match listing {
            Ok(listing) => listing,
            Err(e) => {
                println!("    cannot list its devices: no thread for it: {e}");
                continue;
            }
        };
        if crate::watchdog::finished_within(&listing, LIST_WAIT) {
            match listing.join() {
                Ok(text) => print!("{text}"),
                Err(_) => println!("    listing its devices panicked"),
            }
        } else {
            // Left to end with the process.
            println!(
                "    has not answered in {} s (a JACK server that hangs?)",
                LIST_WAIT.as_secs()
            );
        }
    }
    Ok(())
}

const LIST_WAIT: Duration = supervisor::START_WAIT;

/// A host's output devices, a line each, as `list_devices` prints them.
fn host_devices(id: cpal::HostId) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let host = match cpal::host_from_id(id) {
        Ok(host) => host,
        Err(e) => {
            let _ = writeln!(out, "    unavailable: {e}");
            return out;
        }
    };
    let default = host.default_output_device().map(|d| device_name(&d));
    let devices = match host.output_devices() {
        Ok(devices) => devices,
        Err(e) => {
            let _ = writeln!(out, "    cannot list devices: {e}");
            return out;
        }
    };
    for d in devices {
        let name = device_name(&d);
        let cfg = d
            .default_output_config()
            .map(|c| {
                format!(
                    "{} ch, {} Hz, {:?}",
                    c.channels(),
                    c.sample_rate(),
                    c.sample_format()
                )
            })
            .unwrap_or_else(|e| format!("unusable: {e}"));
        let star = if Some(&name) == default.as_ref() {
            "*"
        } else {
            " "
        };
        let _ = writeln!(out, "  {star} {name}  [{cfg}]");
    }
    out
}
