//! Logs to stderr (the journal, under systemd), filtered by `RUST_LOG` (default `info`).
//!
//! libjack prints several lines at error level for every failed connection attempt, and the
//! output supervisor retries a lost JACK server for as long as it is gone; the supervisor says
//! what is wrong in one line of its own, so libjack's messages are hidden unless `RUST_LOG`
//! names them (`RUST_LOG=info,jack=debug`).

const QUIET_JACK: &str = "jack=off";

pub fn init() {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            if v.contains("jack") {
                v
            } else {
                format!("{v},{QUIET_JACK}")
            }
        })
        .unwrap_or_else(|| format!("info,{QUIET_JACK}"));
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("info,{QUIET_JACK}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal; plain text for the journal and for files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
