//! Helpers shared by the integration tests.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nannou_osc::rosc::{decoder, encoder, OscMessage, OscPacket, OscType};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_roomscore")
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn scene(name: &str) -> PathBuf {
    root().join("scenes").join(format!("{name}.toml"))
}

pub fn roomscore(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run roomscore")
}

/// Runs `roomscore render` and returns its stdout; panics with stderr on failure.
pub fn render(args: &[&str]) -> String {
    let mut all = vec!["render"];
    all.extend_from_slice(args);
    let out = roomscore(&all);
    assert!(
        out.status.success(),
        "render {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn read_wav(path: &Path) -> (hound::WavSpec, Vec<f32>) {
    let mut r = hound::WavReader::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let spec = r.spec();
    let samples = r.samples::<f32>().map(|s| s.unwrap()).collect();
    (spec, samples)
}

/// A free UDP port on loopback.
/// A UDP port for an engine to listen on. Not one the kernel hands out for port 0 (from 32768
/// on): a test's client socket could be given it between the probe and the engine's bind, and
/// then receive the status requests meant for the engine. Each call in this process takes
/// another, so parallel tests never share one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() * 97) % 10_000;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (base + n % 2_000) as u16;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A running `play`. What it logs is read as it comes (a full pipe would stop the engine
/// mid-line), so a test can wait for a line. Dropped, it is killed; dropped by a failing test,
/// it also prints what the engine logged, which a timed-out wait on its status cannot say.
pub struct Playing {
    child: Child,
    log: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Playing {
    fn new(mut child: Child) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        let reader = child.stderr.take().map(|mut stderr| {
            let log = log.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        });
        Playing { child, log, reader }
    }

    /// What the engine has logged so far.
    pub fn logged(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// Waits, within `secs`, until the engine has logged one of `lines`; returns it.
    pub fn wait_for_log<'a>(&self, secs: u64, lines: &[&'a str]) -> &'a str {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let log = self.logged();
            if let Some(line) = lines.iter().find(|l| log.contains(**l)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "the engine did not log any of {lines:?} within {secs} s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// All the engine logged, once it has ended.
    fn log_to_the_end(&mut self) -> Vec<u8> {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        std::mem::take(&mut self.log.lock().unwrap())
    }
}

impl std::ops::Deref for Playing {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl std::ops::DerefMut for Playing {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Playing {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let log = self.log_to_the_end();
        if std::thread::panicking() && !log.is_empty() {
            eprintln!(
                "--- what the engine logged ---\n{}",
                String::from_utf8_lossy(&log)
            );
        }
    }
}

pub fn spawn_play(args: &[&str], env: &[(&str, &str)]) -> Playing {
    let mut cmd = Command::new(bin());
    cmd.arg("play")
        .args(args)
        .current_dir(root())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // A test that fails before it stops its engine must not leave it playing (and loading the
    // machine for every test after it): the engine gets SIGTERM when the test's thread ends.
    // SAFETY: prctl is async-signal-safe, and the closure touches nothing of the parent's.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    Playing::new(cmd.spawn().expect("spawn roomscore play"))
}

/// Plays `seconds` (then the usual fade) recording into `rec`, with `args` added, on a free OSC
/// port; waits for the end and checks it succeeded. Returns what it logged.
pub fn play_recorded(rec: &Path, seconds: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let osc = format!("127.0.0.1:{}", free_port());
    let mut all = vec!["--osc", &osc, "--seconds", seconds, "--record"];
    all.push(rec.to_str().unwrap());
    all.extend_from_slice(args);
    let mut child = spawn_play(&all, env);
    ended_well(terminate_after(&mut child, 25))
}

/// What an engine that was stopped logged, once it is checked to have ended well (exit status 0).
pub fn ended_well(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}: {stderr}", out.status);
    stderr
}

/// Sends SIGTERM (the engine fades out and closes its recording) and waits, bounded: an engine
/// that has not ended 20 s after is killed, and its status then says so.
pub fn terminate(child: &mut Playing) -> Output {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    if !exited_within(child, Duration::from_secs(20)) {
        let _ = child.kill();
    }
    let mut stdout = Vec::new();
    use std::io::Read;
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_end(&mut stdout);
    }
    let status = child.wait().expect("wait");
    let stderr = child.log_to_the_end();
    Output {
        status,
        stdout,
        stderr,
    }
}

pub fn command_exists(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Waits for a `--seconds` run to end by itself, bounded.
pub fn terminate_after(child: &mut Playing, secs: u64) -> std::process::Output {
    exited_within(child, Duration::from_secs(secs));
    terminate(child)
}

/// Whether `child` has exited, waiting at most `within` for it. Every wait on a process here is
/// bounded: a test that would hang on one fails instead.
pub fn exited_within(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The engine's `/roomscore/status` reply (the README lists its arguments). Each test reads
/// the fields it needs.
#[allow(dead_code)]
pub struct Status {
    pub scene: String,
    pub tempo: f32,
    pub notes: i32,
    pub dropped: i32,
    pub xruns: i32,
    pub source: String,
    pub invalid: i32,
    /// `device`, or `null` while the null output plays.
    pub output: String,
    pub device_losses: i32,
    /// Packets and messages refused by `--osc-allow` / `--control-allow`.
    pub denied: i32,
}

/// A socket to talk to an engine from: it waits 300 ms for a reply.
pub fn client() -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    sock
}

/// Sends a bundle of one message, time-tagged for `at`.
pub fn send_bundle_at(
    sock: &UdpSocket,
    port: u16,
    at: std::time::SystemTime,
    addr: &str,
    args: Vec<OscType>,
) {
    let bundle = OscPacket::Bundle(nannou_osc::rosc::OscBundle {
        timetag: nannou_osc::rosc::OscTime::try_from(at).unwrap(),
        content: vec![OscPacket::Message(OscMessage {
            addr: addr.into(),
            args,
        })],
    });
    sock.send_to(&encoder::encode(&bundle).unwrap(), ("127.0.0.1", port))
        .unwrap();
}

pub fn send(sock: &UdpSocket, port: u16, addr: &str, args: Vec<OscType>) {
    let bytes = encoder::encode(&OscPacket::Message(OscMessage {
        addr: addr.into(),
        args,
    }))
    .unwrap();
    sock.send_to(&bytes, ("127.0.0.1", port)).unwrap();
}

pub fn status(sock: &UdpSocket, port: u16) -> Option<Status> {
    send(sock, port, "/roomscore/status", vec![]);
    let mut buf = [0u8; 2048];
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    let (_, packet) = decoder::decode_udp(&buf[..n]).ok()?;
    let OscPacket::Message(m) = packet else {
        return None;
    };
    assert_eq!(m.addr, "/roomscore/status");
    let s = |i: usize| match &m.args[i] {
        OscType::String(s) => s.clone(),
        other => panic!("arg {i} is {other:?}"),
    };
    let int = |i: usize| match &m.args[i] {
        OscType::Int(v) => *v,
        other => panic!("arg {i} is {other:?}"),
    };
    let float = |i: usize| match &m.args[i] {
        OscType::Float(v) => *v,
        other => panic!("arg {i} is {other:?}"),
    };
    Some(Status {
        scene: s(0),
        tempo: float(1),
        notes: int(2),
        dropped: int(3),
        xruns: int(4),
        source: s(5),
        invalid: int(6),
        output: s(11),
        device_losses: int(12),
        denied: int(13),
    })
}

pub fn wait_for_status(sock: &UdpSocket, port: u16) -> Status {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = status(sock, port) {
            return s;
        }
        assert!(Instant::now() < deadline, "no /roomscore/status reply");
    }
}

/// The number after `key` (such as `xruns=`) in the engine's last log line that has one.
pub fn logged_count(log: &str, key: &str) -> usize {
    log.rsplit(key)
        .next()
        .filter(|_| log.contains(key))
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the log:\n{log}"))
}
