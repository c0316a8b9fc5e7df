//! `play` through cpal's JACK host against a JACK dummy server, paced in real time, with what
//! reaches the playback ports captured by `jack_capture`. The test runs its own named server so
//! it neither needs nor disturbs one that is already running.

use std::process::{Command, Stdio};
use std::time::Duration;

use super::common::*;

/// The samples of a 32-bit float WAV, read from its `data` chunk. jack_capture writes an
/// extensible header through libsndfile, which hound does not decode as plain float samples.
fn float_data_chunk(bytes: &[u8]) -> Vec<f32> {
    assert_eq!(&bytes[..4], b"RIFF");
    let mut i = 12;
    while i + 8 <= bytes.len() {
        let id = &bytes[i..i + 4];
        let len = u32::from_le_bytes(bytes[i + 4..i + 8].try_into().unwrap()) as usize;
        if id == b"data" {
            let end = (i + 8 + len).min(bytes.len());
            return bytes[i + 8..end]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
        }
        i += 8 + len + (len & 1);
    }
    panic!("no data chunk");
}

struct Jack(std::process::Child);

impl Drop for Jack {
    // SIGTERM, not SIGKILL: a killed jackd leaves its entry in JACK's shared-memory registry,
    // and after a few of those no server can start on the machine ("Too many servers").
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn play_through_jack_reaches_the_playback_ports_sample_for_sample() {
    for tool in ["jackd", "jack_capture", "jack_lsp"] {
        assert!(
            command_exists(tool),
            "{tool} is needed (apt-get install jackd2 jack-capture)"
        );
    }
    let server = format!("roomscore-test-{}", std::process::id());
    let jackd = Jack(
        Command::new("jackd")
            .args([
                "-n",
                &server,
                "--no-realtime",
                "-d",
                "dummy",
                "-r",
                "48000",
                "-p",
                "256",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start jackd"),
    );
    let up = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        Command::new("jack_lsp")
            .env("JACK_DEFAULT_SERVER", &server)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("system:playback_1"))
            .unwrap_or(false)
    });
    assert!(up, "jackd dummy server did not come up");

    let dir = tempfile::tempdir().unwrap();
    let captured = dir.path().join("capture.wav");
    let rec = dir.path().join("rec.wav");
    let mut capture = Command::new("jack_capture")
        .args(["-b", "FLOAT", "-d", "6", "--daemon"])
        .arg(&captured)
        .env("JACK_DEFAULT_SERVER", &server)
        .spawn()
        .expect("start jack_capture");
    std::thread::sleep(Duration::from_millis(500));
    let osc = format!("127.0.0.1:{}", free_port());
    let mut child = spawn_play(
        &[
            "--host",
            "jack",
            "--buffer",
            "256",
            "--osc",
            &osc,
            "--record",
            rec.to_str().unwrap(),
            "--seconds",
            "3",
        ],
        &[("JACK_DEFAULT_SERVER", &server)],
    );
    let out = terminate_after(&mut child, 20);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("JACK device"), "{stderr}");
    let _ = capture.wait();
    drop(jackd);

    let cap = float_data_chunk(&std::fs::read(&captured).unwrap());
    let (_, recorded) = read_wav(&rec);
    // Windows of the recording (from half a second in: the first callbacks run before JACK
    // connects the ports) must each appear bit for bit in the capture. An xrun on a loaded
    // machine can cut one window, so three of four must be found.
    let found = [0.5, 1.0, 1.5, 2.0]
        .iter()
        .filter(|&&at| {
            let k = ((at * 48_000.0) as usize) * 2;
            let window = &recorded[k..k + 2 * 1024];
            assert!(window.iter().any(|s| s.abs() > 1e-4), "sound at {at} s");
            (0..cap.len().saturating_sub(window.len()))
                .step_by(2)
                .any(|j| {
                    cap[j..j + window.len()]
                        .iter()
                        .zip(window)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                })
        })
        .count();
    assert!(
        found >= 3,
        "{found} of 4 windows reached the playback ports bit-exact"
    );
}
