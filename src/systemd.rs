//! systemd integration without libsystemd: the `sd_notify(3)` protocol is one datagram of
//! newline-separated `KEY=VALUE` assignments sent to the Unix socket named by `NOTIFY_SOCKET`,
//! so a `Type=notify` unit can learn when the engine is ready, what it is doing, and (with
//! `WatchdogSec=`) that the control loop is still alive. `NOTIFY_SOCKET` is a filesystem path,
//! or an abstract-namespace name when it starts with `@`. Outside systemd the variable is
//! unset and every call is a no-op that returns `Ok`, so callers never need to branch.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={value:?}: {reason}")]
    BadSocket { value: String, reason: String },
    #[error("WATCHDOG_USEC={0:?}: expected a whole number of microseconds")]
    BadWatchdogUsec(String),
    #[error("WATCHDOG_PID={0:?}: expected a process id")]
    BadWatchdogPid(String),
    #[error("could not create a notify socket: {0}")]
    Socket(#[source] io::Error),
    #[error("could not send {message:?} to the notify socket: {source}")]
    Send {
        message: String,
        #[source]
        source: io::Error,
    },
}

/// Sends state changes to the service manager; inert when not started by one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// A notifier that sends nothing: what `from_env` gives outside systemd.
    pub fn disabled() -> Self {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Unset or empty
    /// `NOTIFY_SOCKET` gives a disabled notifier rather than an error, because running by hand
    /// is normal.
    pub fn from_env() -> Result<Self, NotifyError> {
        Self::from_vars(
            std::env::var_os("NOTIFY_SOCKET"),
            std::env::var_os("WATCHDOG_USEC"),
            std::env::var_os("WATCHDOG_PID"),
            std::process::id(),
        )
    }

    /// `from_env` with the environment passed in, so tests need not mutate process state.
    fn from_vars(
        notify_socket: Option<OsString>,
        watchdog_usec: Option<OsString>,
        watchdog_pid: Option<OsString>,
        our_pid: u32,
    ) -> Result<Self, NotifyError> {
        let watchdog = parse_watchdog(watchdog_usec.as_deref(), watchdog_pid.as_deref(), our_pid)?;
        match notify_socket {
            Some(s) if !s.is_empty() => Self::new(s, watchdog),
            // A watchdog without a socket to ping is useless, so it is dropped with it.
            _ => Ok(Self::disabled()),
        }
    }

    /// A notifier for an explicit socket (`@name` for the abstract namespace) and watchdog
    /// timeout (the full `WATCHDOG_USEC`, not the ping interval).
    pub fn new(socket: impl AsRef<OsStr>, watchdog: Option<Duration>) -> Result<Self, NotifyError> {
        let addr = socket_addr(socket.as_ref())?;
        // Unbound: the service manager identifies the sender by its credentials, not its address.
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        Ok(Notifier {
            target: Some(Target { socket, addr }),
            watchdog: watchdog.filter(|d| !d.is_zero()),
        })
    }

    /// Whether messages go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to call `watchdog()`: half the timeout, as sd_watchdog_enabled(3) advises, so
    /// one late tick does not get the engine killed. `None` when no watchdog is configured.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Startup is complete.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send("READY=1")
    }

    /// The engine is alive; call every `watchdog_interval()`.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send("WATCHDOG=1")
    }

    /// Free-form status shown by `systemctl status`.
    pub fn status(&self, text: &str) -> Result<(), NotifyError> {
        // A newline would start a new assignment, letting a scene name (say) send READY=1 or
        // MAINPID=; flatten it.
        let text = text.replace(['\n', '\r'], " ");
        self.send(&format!("STATUS={text}"))
    }

    /// Shutdown has begun.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send("STOPPING=1")
    }

    /// A reload (scene or config) has begun; send `ready()` when it is done.
    pub fn reloading(&self) -> Result<(), NotifyError> {
        self.send("RELOADING=1")
    }

    fn send(&self, message: &str) -> Result<(), NotifyError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let err = |source| NotifyError::Send {
            message: message.to_string(),
            source,
        };
        let sent = target
            .socket
            .send_to_addr(message.as_bytes(), &target.addr)
            .map_err(err)?;
        if sent != message.len() {
            return Err(err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", message.len()),
            )));
        }
        Ok(())
    }
}

fn socket_addr(value: &OsStr) -> Result<SocketAddr, NotifyError> {
    let bad = |reason: &str| NotifyError::BadSocket {
        value: value.to_string_lossy().into_owned(),
        reason: reason.to_string(),
    };
    let bytes = value.as_bytes();
    match bytes.first() {
        None => Err(bad("empty")),
        Some(b'@') => abstract_addr(&bytes[1..]).map_err(|e| bad(&e.to_string())),
        Some(b'/') => SocketAddr::from_pathname(value).map_err(|e| bad(&e.to_string())),
        // systemd itself only accepts absolute paths or '@'; a relative path would depend on
        // our working directory, which systemd never meant.
        Some(_) => Err(bad("expected an absolute path or @abstract-name")),
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

fn parse_watchdog(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    our_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let text = usec.to_string_lossy();
    let micros: u64 = text
        .trim()
        .parse()
        .map_err(|_| NotifyError::BadWatchdogUsec(text.to_string()))?;
    if let Some(pid) = pid.filter(|s| !s.is_empty()) {
        let text = pid.to_string_lossy();
        let pid: u32 = text
            .trim()
            .parse()
            .map_err(|_| NotifyError::BadWatchdogPid(text.to_string()))?;
        // The variables are inherited by children (a shell hook, say); only the process the
        // unit's watchdog is watching should ping it.
        if pid != our_pid {
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_micros(micros)).filter(|d| !d.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        (dir, path, server)
    }

    fn recv(server: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).expect("recv");
        String::from_utf8(buf[..n].to_vec()).expect("utf8")
    }

    #[test]
    fn sends_each_message_to_a_path_socket() {
        let (_dir, path, server) = bound();
        let n = Notifier::new(&path, None).unwrap();
        assert!(n.is_enabled());
        n.ready().unwrap();
        assert_eq!(recv(&server), "READY=1");
        n.watchdog().unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
        n.status("playing scene dusk").unwrap();
        assert_eq!(recv(&server), "STATUS=playing scene dusk");
        n.reloading().unwrap();
        assert_eq!(recv(&server), "RELOADING=1");
        n.stopping().unwrap();
        assert_eq!(recv(&server), "STOPPING=1");
    }

    #[test]
    fn status_cannot_inject_assignments() {
        let (_dir, path, server) = bound();
        let n = Notifier::new(&path, None).unwrap();
        n.status("evil\nREADY=1\r\nMAINPID=1").unwrap();
        assert_eq!(recv(&server), "STATUS=evil READY=1  MAINPID=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "roomscore-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::new(format!("@{name}"), None).unwrap();
        n.ready().unwrap();
        assert_eq!(recv(&server), "READY=1");
    }

    #[test]
    fn unset_socket_is_a_silent_no_op() {
        let n = Notifier::from_vars(None, Some("30000000".into()), None, 7).unwrap();
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready().unwrap();
        n.watchdog().unwrap();
        n.status("x").unwrap();
        n.stopping().unwrap();
        n.reloading().unwrap();
        let empty = Notifier::from_vars(Some("".into()), None, None, 7).unwrap();
        assert!(!empty.is_enabled());
    }

    #[test]
    fn from_vars_reads_socket_and_watchdog() {
        let (_dir, path, server) = bound();
        let n = Notifier::from_vars(
            Some(path.clone().into_os_string()),
            Some("30000000".into()),
            Some("4242".into()),
            4242,
        )
        .unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        n.watchdog().unwrap();
        assert_eq!(recv(&server), "WATCHDOG=1");
    }

    #[test]
    fn watchdog_for_another_pid_is_ignored() {
        assert_eq!(
            parse_watchdog(Some("1000000".as_ref()), Some("99".as_ref()), 100).unwrap(),
            None
        );
        // No WATCHDOG_PID means the watchdog is ours.
        assert_eq!(
            parse_watchdog(Some("1000000".as_ref()), None, 100).unwrap(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(parse_watchdog(Some("0".as_ref()), None, 100).unwrap(), None);
        assert_eq!(
            parse_watchdog(None, Some("100".as_ref()), 100).unwrap(),
            None
        );
    }

    #[test]
    fn bad_watchdog_values_are_errors() {
        let e = parse_watchdog(Some("30s".as_ref()), None, 1).unwrap_err();
        assert!(
            matches!(e, NotifyError::BadWatchdogUsec(ref s) if s == "30s"),
            "{e}"
        );
        let e = parse_watchdog(Some("-5".as_ref()), None, 1).unwrap_err();
        assert!(matches!(e, NotifyError::BadWatchdogUsec(_)), "{e}");
        let e = parse_watchdog(Some("5".as_ref()), Some("me".as_ref()), 1).unwrap_err();
        assert!(
            matches!(e, NotifyError::BadWatchdogPid(ref s) if s == "me"),
            "{e}"
        );
    }

    #[test]
    fn explicit_watchdog_interval_is_half_the_timeout() {
        let (_dir, path, _server) = bound();
        let n = Notifier::new(&path, Some(Duration::from_secs(10))).unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));
        let n = Notifier::new(&path, Some(Duration::ZERO)).unwrap();
        assert_eq!(n.watchdog_interval(), None);
    }

    #[test]
    fn bad_socket_values_are_errors() {
        let e = Notifier::new("relative/notify.sock", None).unwrap_err();
        assert!(e.to_string().contains("relative/notify.sock"), "{e}");
        assert!(matches!(e, NotifyError::BadSocket { .. }));
        let long = format!("/{}", "x".repeat(200));
        let e = Notifier::new(&long, None).unwrap_err();
        assert!(matches!(e, NotifyError::BadSocket { .. }), "{e}");
    }

    #[test]
    fn send_to_a_missing_socket_reports_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(dir.path().join("gone.sock"), None).unwrap();
        let e = n.ready().unwrap_err();
        assert!(
            matches!(e, NotifyError::Send { ref message, .. } if message == "READY=1"),
            "{e}"
        );
    }
}
