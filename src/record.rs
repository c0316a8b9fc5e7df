//! Recording what the room heard: the audio thread pushes its output into a bounded queue, and
//! a writer thread drains it into a float WAV. Stopping drains the queue and finalises the
//! header, so a recording ends cleanly on SIGTERM; the header is also kept current while it
//! records, and a long recording is written in parts of an hour.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: cannot record: {message}")]
    Wav { path: PathBuf, message: String },
}

/// Every WAV the engine writes, live or offline: stereo 32-bit float.
pub fn wav_spec(sample_rate: u32) -> hound::WavSpec {
    hound::WavSpec {
        channels: 2,
        sample_rate,
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    }
}

pub struct Recorder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64, RecordError>>>,
    path: PathBuf,
}

/// A part's length: a float WAV's header counts its bytes in 32 bits (4 GiB, 3.1 hours of
/// 48 kHz stereo), so a night is written an hour a file; the part before is moved aside as an
/// earlier run's file is (`crate::aside`), and the recording always goes on at its own path.
const PART_SECONDS: u32 = 3600;
/// Frames in a part: an hour, or what fits in a header's 32-bit byte count at a rate where an
/// hour does not (above 149 kHz).
fn part_frames(sample_rate: u32) -> u64 {
    let fits = (u64::from(u32::MAX) - 64) / 8;
    (u64::from(PART_SECONDS) * u64::from(sample_rate)).clamp(1, fits)
}

/// How often the header is brought up to date: a recording cut off by a crash or a watchdog
/// kill reads back whole up to that point, not as an empty file.
const HEADER_EVERY_SECONDS: u32 = 1;
/// Every this many header updates, the file is also synced to the disk, so a power cut loses at
/// most this much: an fsync on a kiosk's SD card can take a while, and the writer has seconds
/// of queue to spare.
const SYNC_EVERY_HEADERS: u32 = 10;

type Wav = hound::WavWriter<std::io::BufWriter<std::fs::File>>;

/// Syncs a recording's file to the disk.
fn sync(file: &std::fs::File, path: &Path) -> Result<(), RecordError> {
    file.sync_data().map_err(|e| RecordError::Wav {
        path: path.to_path_buf(),
        message: format!("cannot sync to the disk: {e}"),
    })
}

/// A WAV writer, and a handle to its file to sync it by.
fn create_wav(path: &Path, sample_rate: u32) -> Result<(Wav, std::fs::File), String> {
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let sync = file.try_clone().map_err(|e| e.to_string())?;
    let writer = hound::WavWriter::new(std::io::BufWriter::new(file), wav_spec(sample_rate))
        .map_err(|e| e.to_string())?;
    Ok((writer, sync))
}

impl Recorder {
    /// Creates the file now (so a bad path fails before any sound) and starts the writer.
    /// The queue holds `seconds` of audio.
    pub fn start(
        path: &Path,
        sample_rate: u32,
        seconds: f32,
    ) -> Result<(Recorder, rtrb::Producer<f32>), RecordError> {
        Self::start_in_parts(path, sample_rate, seconds, part_frames(sample_rate))
    }

    /// `start`, with a new file every `part_frames`.
    fn start_in_parts(
        path: &Path,
        sample_rate: u32,
        seconds: f32,
        part_frames: u64,
    ) -> Result<(Recorder, rtrb::Producer<f32>), RecordError> {
        let part_frames = part_frames.max(1);
        let (mut writer, mut file) =
            create_wav(path, sample_rate).map_err(|message| RecordError::Wav {
                path: path.to_path_buf(),
                message,
            })?;
        let (tx, mut rx) = rtrb::RingBuffer::new((sample_rate as f32 * seconds) as usize * 2);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let p = path.to_path_buf();
        let header_every = u64::from(HEADER_EVERY_SECONDS) * u64::from(sample_rate);
        let thread = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || {
                let err = |e: hound::Error| RecordError::Wav {
                    path: p.clone(),
                    message: e.to_string(),
                };
                let (mut written, mut in_part, mut unflushed) = (0u64, 0u64, 0u64);
                let mut headers = 0u32;
                let result = loop {
                    let stopping = stop2.load(Ordering::Acquire);
                    // Whole frames only, so a stop never leaves half a frame; and no more than
                    // the part has room for.
                    let n = rx.slots().min(2 * (part_frames - in_part) as usize);
                    let n = n - n % 2;
                    if n > 0 {
                        let chunk = rx.read_chunk(n).expect("slots were counted");
                        let (a, b) = chunk.as_slices();
                        if let Err(e) = a.iter().chain(b).try_for_each(|&s| writer.write_sample(s))
                        {
                            break Err(err(e));
                        }
                        chunk.commit_all();
                        let frames = n as u64 / 2;
                        (written, in_part, unflushed) =
                            (written + frames, in_part + frames, unflushed + frames);
                    }
                    if in_part == part_frames {
                        match next_part(writer, &file, &p, sample_rate) {
                            Ok((w, f)) => (writer, file, in_part, unflushed) = (w, f, 0, 0),
                            Err(e) => {
                                tracing::error!("{e}; recording stopped");
                                return Err(e);
                            }
                        }
                    } else if unflushed >= header_every {
                        if let Err(e) = writer.flush() {
                            break Err(err(e));
                        }
                        unflushed = 0;
                        headers += 1;
                        if headers.is_multiple_of(SYNC_EVERY_HEADERS) {
                            if let Err(e) = sync(&file, &p) {
                                break Err(e);
                            }
                        }
                    }
                    if stopping && rx.is_empty() {
                        break Ok(());
                    }
                    if n == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                };
                // The file is closed whole even after a write failed (a full disk): what was
                // written stays readable.
                let closed = writer
                    .finalize()
                    .map_err(err)
                    .and_then(|()| sync(&file, &p));
                result.and(closed).map(|()| written).inspect_err(|e| {
                    tracing::error!("{e}; recording stopped");
                })
            })
            .expect("spawn recorder thread");
        Ok((
            Recorder {
                stop,
                thread: Some(thread),
                path: path.to_path_buf(),
            },
            tx,
        ))
    }

    /// Drains what is queued, closes the file, and returns the frames written.
    pub fn finish(mut self) -> Result<u64, RecordError> {
        // Only `drop` closes it otherwise, and that runs after this.
        self.close().unwrap_or(Ok(0))
    }

    /// Stops the writer once it has drained the queue; `None` if it was stopped before.
    fn close(&mut self) -> Option<Result<u64, RecordError>> {
        let thread = self.thread.take()?;
        self.stop.store(true, Ordering::Release);
        Some(thread.join().unwrap_or_else(|_| {
            Err(RecordError::Wav {
                path: self.path.clone(),
                message: "writer thread panicked".into(),
            })
        }))
    }
}

impl Drop for Recorder {
    /// A recording not finished (`play` stopped by an error after it started) is still closed
    /// with what was queued: a whole file, never one with a header that lies about its length.
    fn drop(&mut self) {
        match self.close() {
            Some(Ok(frames)) => tracing::info!(
                "recording closed early: {frames} frames in {}",
                self.path.display()
            ),
            Some(Err(e)) => tracing::error!("{e}"),
            None => {}
        }
    }
}

/// Closes a full part, moves it aside, and opens the next at `path`.
fn next_part(
    writer: Wav,
    file: &std::fs::File,
    path: &Path,
    sample_rate: u32,
) -> Result<(Wav, std::fs::File), RecordError> {
    let err = |message: String| RecordError::Wav {
        path: path.to_path_buf(),
        message,
    };
    writer.finalize().map_err(|e| err(e.to_string()))?;
    sync(file, path)?;
    let kept = crate::aside::move_aside(path)
        .map_err(|e| err(format!("cannot move the full part aside: {e}")))?;
    if let Some(kept) = kept {
        tracing::info!("recording: a part is full and kept as {}", kept.display());
    }
    create_wav(path, sample_rate).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_dropped_unfinished_is_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropped.wav");
        let (rec, mut tx) = Recorder::start(&path, 48_000, 1.0).unwrap();
        for i in 0..960 {
            tx.push(i as f32 / 960.0).unwrap();
        }
        drop(rec);
        let mut r = hound::WavReader::open(&path).unwrap();
        assert_eq!(r.spec(), wav_spec(48_000));
        let samples: Vec<f32> = r.samples::<f32>().map(Result::unwrap).collect();
        assert_eq!(samples.len(), 960);
        assert_eq!(samples[959], 959.0 / 960.0);
    }

    /// Read back while it is still being written, as after a crash: whole up to the last
    /// header update.
    #[test]
    fn a_recording_reads_back_whole_while_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("live.wav");
        let (rec, mut tx) = Recorder::start(&path, 8_000, 4.0).unwrap();
        for i in 0..2 * 8_000 * 3 {
            tx.push((i % 100) as f32 / 100.0).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let frames = loop {
            let frames = hound::WavReader::open(&path).map_or(0, |r| r.duration());
            if frames >= 2 * 8_000 || std::time::Instant::now() > deadline {
                break frames;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(frames >= 2 * 8_000, "the header said {frames} frames");
        assert_eq!(rec.finish().unwrap(), 3 * 8_000);
    }

    #[test]
    fn a_part_is_an_hour_where_its_header_can_count_it() {
        assert_eq!(part_frames(48_000), 3600 * 48_000);
        // 192 kHz: an hour of stereo float would be 5.5 GB.
        assert!(part_frames(192_000) * 8 + 64 <= u64::from(u32::MAX));
        assert_eq!(part_frames(0), 1);
    }

    /// Parts: each whole, the earlier ones aside, no sample lost or doubled between them.
    #[test]
    fn a_long_recording_goes_on_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("night.wav");
        let (rec, mut tx) = Recorder::start_in_parts(&path, 8_000, 1.0, 1_000).unwrap();
        let total = 2_500;
        let mut pushed = 0;
        while pushed < 2 * total {
            if tx.push(pushed as f32).is_ok() {
                pushed += 1;
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(rec.finish().unwrap(), total as u64);
        let mut parts: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p != &path)
            .collect();
        assert_eq!(parts.len(), 2, "{parts:?}");
        let samples = |p: &Path| -> Vec<f32> {
            let mut r = hound::WavReader::open(p).unwrap();
            r.samples::<f32>().map(Result::unwrap).collect()
        };
        // In the order they were written: by their first sample.
        parts.sort_by(|a, b| samples(a)[0].total_cmp(&samples(b)[0]));
        parts.push(path);
        let all: Vec<f32> = parts.iter().flat_map(|p| samples(p)).collect();
        assert_eq!(
            parts.iter().map(|p| samples(p).len()).collect::<Vec<_>>(),
            [2_000, 2_000, 1_000]
        );
        assert!(all.iter().enumerate().all(|(i, &s)| s == i as f32));
    }
}
