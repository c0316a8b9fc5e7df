//! A private JACK dummy server for the tests that play through JACK, and the helpers they share.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::common::*;

/// The samples of a 32-bit float WAV, read from its `data` chunk. jack_capture writes an
/// extensible header through libsndfile, which hound does not decode as plain float samples.
pub fn float_data_chunk(bytes: &[u8]) -> Vec<f32> {
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

/// A named `jackd` dummy server (48 kHz unless asked otherwise), 256 frames, stopped with SIGTERM when dropped: a
/// killed jackd leaves its entry in JACK's shared-memory registry, and after a few of those no
/// server can start on the machine ("Too many servers already active").
pub struct Jack {
    pub name: String,
    child: std::process::Child,
    /// Dropped after the server has stopped (fields drop after `Drop::drop`).
    _slot: Slot,
}

/// JACK's shared-memory registry holds 8 servers, one of them `.ci/run`'s, and a server that
/// does not stop within `Drop`'s 20 s is killed and keeps its entry for good: tests in parallel
/// (a thread per CPU) run at most this many of their own at once. None holds two.
const SERVERS_AT_ONCE: usize = 4;
static SERVERS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// One of `SERVERS_AT_ONCE`, taken until dropped.
struct Slot;

impl Slot {
    fn take() -> Slot {
        let (count, freed) = &SERVERS;
        let mut n = count.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= SERVERS_AT_ONCE {
            n = freed.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (count, freed) = &SERVERS;
        *count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        freed.notify_one();
    }
}

impl Jack {
    /// A server without real-time scheduling: what any machine can run.
    pub fn start(name: &str) -> Jack {
        Jack::start_at(name, 48_000)
    }

    /// `start`, at another sample rate.
    pub fn start_at(name: &str, rate: u32) -> Jack {
        Jack::launch(name, "--no-realtime", rate).expect("jackd dummy server did not come up")
    }

    /// A server with real-time scheduling where the machine grants it (as root, or with
    /// rtprio limits), else without; the second value says which. (Used by tests/latency.rs.)
    #[allow(dead_code)]
    pub fn start_realtime(name: &str) -> (Jack, bool) {
        match Jack::launch(name, "--realtime", 48_000) {
            Some(j) => (j, true),
            None => (Jack::start(name), false),
        }
    }

    fn launch(name: &str, mode: &str, rate: u32) -> Option<Jack> {
        for tool in ["jackd", "jack_capture", "jack_lsp"] {
            assert!(
                command_exists(tool),
                "{tool} is needed (apt-get install jackd2 jack-capture)"
            );
        }
        let slot = Slot::take();
        let child = Command::new("jackd")
            .args([
                "-n",
                name,
                mode,
                "-d",
                "dummy",
                "-r",
                &rate.to_string(),
                "-p",
                "256",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start jackd");
        let mut jack = Jack {
            name: name.to_string(),
            child,
            _slot: slot,
        };
        let up = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(Some(_)) = jack.child.try_wait() {
                return false;
            }
            jack.ports().contains("system:playback_1")
        });
        up.then_some(jack)
    }

    /// Starts `play` on this server through cpal's JACK host at 256 frames, with OSC on
    /// `port`, plus `args`.
    pub fn play(&self, port: u16, args: &[&str]) -> Playing {
        let osc = format!("127.0.0.1:{port}");
        let mut all = vec!["--host", "jack", "--buffer", "256", "--osc", &osc];
        all.extend_from_slice(args);
        spawn_play(&all, &[("JACK_DEFAULT_SERVER", &self.name)])
    }

    /// Starts `play` on this server for `seconds`, with OSC on a free port, and waits until it
    /// plays on the device. Returns the engine, its port and a client to ask its status from.
    pub fn play_on_device(&self, seconds: &str) -> (Playing, u16, UdpSocket) {
        let port = free_port();
        let child = self.play(port, &["--seconds", seconds]);
        let sock = client();
        status_until(&sock, port, 20, "playing on the device", |s| {
            s.output == "device"
        });
        (child, port, sock)
    }

    /// Starts `jack_capture` on the playback ports for `seconds`.
    /// Returns once its input ports exist: a capture that had not yet connected when the
    /// music began (or that died connecting, as it once did in CI) lost the take, and the test
    /// then found no file at all. A capture that dies is started again, up to three times.
    pub fn capture(&self, to: &Path, seconds: u32) -> std::process::Child {
        let log = to.with_extension("capture.log");
        let mut why = String::new();
        for _ in 0..3 {
            let mut child = Command::new("jack_capture")
                .args(["-b", "FLOAT", "-d", &seconds.to_string(), "--daemon"])
                .arg(to)
                .env("JACK_DEFAULT_SERVER", &self.name)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("capture log"))
                .spawn()
                .expect("start jack_capture");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    why = format!(
                        "{status}: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                if self.ports().contains("jack_capture:input1") {
                    return child;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("jack_capture never connected to {}: {why}", self.name);
    }

    /// Stops the server in its tracks (SIGSTOP), as a wedged driver would: it neither runs its
    /// clients nor answers them, and says nothing.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen server go on.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} jackd");
    }

    /// Waits for a `capture` to end by itself; one still running 30 s on (libjack can deadlock
    /// in a client's close, see `ports`) is killed, so that a test fails rather than hangs.
    pub fn end_capture(mut capture: std::process::Child) {
        exited_within(&mut capture, Duration::from_secs(30));
        let _ = capture.kill();
        let _ = capture.wait();
    }

    /// The server's ports, as `jack_lsp` lists them; none if it has not answered in 5 s.
    /// libjack can deadlock in a client's close against a server that is starting (seen in CI:
    /// `jack_lsp` stuck in `jack_client_close` for good), so it is never waited on unbounded.
    pub fn ports(&self) -> String {
        let Ok(mut lsp) = Command::new("jack_lsp")
            .env("JACK_DEFAULT_SERVER", &self.name)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            return String::new();
        };
        exited_within(&mut lsp, Duration::from_secs(5));
        let _ = lsp.kill();
        // A few ports' names: they fit in the pipe, so the exit never waited on this read.
        lsp.wait_with_output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Jack {
    fn drop(&mut self) {
        // A frozen server would hold SIGTERM until it was let go.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        // A server left with a client whose process ended while it was frozen waits 5 s for
        // that client before it exits; killed meanwhile, it would leave its registry entry.
        if exited_within(&mut self.child, Duration::from_secs(20)) {
            return self.sweep();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Jack {
    /// Removes what clients of this server left in /dev/shm (a client whose process ended
    /// while the server was frozen leaves its semaphore); the name is this test's alone.
    fn sweep(&self) {
        let mine = format!("_{}_", self.name);
        for entry in std::fs::read_dir("/dev/shm")
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().contains(&mine) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Waits until the engine has a thread named `name`.
pub fn wait_for_thread(child: &mut Playing, name: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let pid = child.id();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the engine ended ({status}) before it had a thread {name:?}: {}",
                child.logged()
            );
        }
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
        let found = tasks.into_iter().flatten().flatten().any(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == name)
        });
        if found {
            return;
        }
        assert!(Instant::now() < deadline, "no thread {name:?} in {secs} s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn server_name(test: &str) -> String {
    format!("roomscore-{test}-{}", std::process::id())
}

/// Polls the engine's status until `pred` holds, within `secs`.
pub fn status_until(
    sock: &UdpSocket,
    port: u16,
    secs: u64,
    what: &str,
    pred: impl Fn(&Status) -> bool,
) -> Status {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = status(sock, port) {
            if pred(&s) {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `window` (interleaved stereo) appears bit for bit somewhere in `cap`, frame-aligned.
pub fn appears_in(cap: &[f32], window: &[f32]) -> bool {
    (0..cap.len().saturating_sub(window.len()))
        .step_by(2)
        .any(|j| {
            cap[j..j + window.len()]
                .iter()
                .zip(window)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        })
}
