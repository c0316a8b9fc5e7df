//! Recording what the room heard: the audio thread pushes its output into a bounded queue, and
//! a writer thread drains it into a float WAV. Stopping drains the queue and finalises the
//! header, so a recording ends cleanly on SIGTERM.

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

impl Recorder {
    /// Creates the file now (so a bad path fails before any sound) and starts the writer.
    /// The queue holds `seconds` of audio.
    pub fn start(
        path: &Path,
        sample_rate: u32,
        seconds: f32,
    ) -> Result<(Recorder, rtrb::Producer<f32>), RecordError> {
        let err = |e: hound::Error| RecordError::Wav {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut writer = hound::WavWriter::create(path, wav_spec(sample_rate)).map_err(err)?;
        let (tx, mut rx) = rtrb::RingBuffer::new((sample_rate as f32 * seconds) as usize * 2);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let p = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || {
                let err = |e: hound::Error| RecordError::Wav {
                    path: p.clone(),
                    message: e.to_string(),
                };
                let mut written = 0u64;
                loop {
                    let stopping = stop2.load(Ordering::Acquire);
                    let n = rx.slots();
                    // Whole frames only, so a stop never leaves half a frame.
                    let n = n - n % 2;
                    if n > 0 {
                        let chunk = rx.read_chunk(n).expect("slots were counted");
                        let (a, b) = chunk.as_slices();
                        for &s in a.iter().chain(b) {
                            writer.write_sample(s).map_err(err)?;
                        }
                        chunk.commit_all();
                        written += n as u64 / 2;
                    }
                    if stopping && rx.is_empty() {
                        break;
                    }
                    if n == 0 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                writer.finalize().map_err(err)?;
                Ok(written)
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
}
