//! Input logs: JSON Lines, one OSC message per line, `{"t": 2.5, "addr": "/roomscore/movement",
//! "args": [0.8]}` with `t` in seconds from the start. `play --log-inputs` writes them and
//! `render --inputs` replays them.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use nannou_osc::rosc::{OscMessage, OscType};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: cannot read input log: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot write input log: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// One logged message.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedMessage {
    pub t: f64,
    pub message: OscMessage,
}

/// Reads a whole input log, sorted by time (stable, so equal times keep their order).
pub fn read(path: &Path) -> Result<Vec<LoggedMessage>, LogError> {
    let file = std::fs::File::open(path).map_err(|source| LogError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let msg = parse_line(&line).map_err(|message| LogError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        })?;
        out.push(msg);
    }
    out.sort_by(|a, b| a.t.total_cmp(&b.t));
    Ok(out)
}

pub fn parse_line(line: &str) -> Result<LoggedMessage, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("expected an object {\"t\", \"addr\", \"args\"}")?;
    for k in obj.keys() {
        if !matches!(k.as_str(), "t" | "addr" | "args") {
            return Err(format!("unknown field {k:?} (expected t, addr, args)"));
        }
    }
    let t = obj
        .get("t")
        .and_then(Value::as_f64)
        .ok_or("field \"t\" must be a number of seconds")?;
    if !t.is_finite() || t < 0.0 {
        return Err(format!("field \"t\" is {t}, expected seconds >= 0"));
    }
    let addr = obj
        .get("addr")
        .and_then(Value::as_str)
        .ok_or("field \"addr\" must be a string")?;
    if !addr.starts_with('/') {
        return Err(format!(
            "field \"addr\" is {addr:?}, expected an OSC address"
        ));
    }
    let args = match obj.get("args") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                json_to_osc(v)
                    .ok_or_else(|| format!("args[{i}] = {v} is not a number, string or bool"))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(format!("field \"args\" is {other}, expected an array")),
    };
    Ok(LoggedMessage {
        t,
        message: OscMessage {
            addr: addr.to_string(),
            args,
        },
    })
}

fn json_to_osc(v: &Value) -> Option<OscType> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(i32::try_from(i).map_or(OscType::Long(i), OscType::Int))
            } else {
                n.as_f64().map(|f| OscType::Float(f as f32))
            }
        }
        Value::String(s) => Some(OscType::String(s.clone())),
        Value::Bool(b) => Some(OscType::Bool(*b)),
        _ => None,
    }
}

/// Checks logged messages against the OSC address space and places each on the sample clock.
/// Refused messages are logged with their position in `path` and counted.
pub fn to_events(
    path: &Path,
    messages: &[LoggedMessage],
    sample_rate: u32,
) -> (Vec<(u64, super::InputEvent)>, usize) {
    let from: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut out = Vec::new();
    let mut refused = 0;
    for (i, m) in messages.iter().enumerate() {
        match super::dispatch::message(&m.message, from) {
            Ok(event) => out.push(((m.t * sample_rate as f64).round() as u64, event)),
            Err(e) => {
                refused += 1;
                tracing::warn!("{}: message {}: {e}", path.display(), i + 1);
            }
        }
    }
    (out, refused)
}

/// Formats one message as a log line (no newline). Floats keep a decimal point so that they
/// replay as floats; values JSON cannot hold are written as null.
pub fn format_line(t: f64, message: &OscMessage) -> String {
    let mut s = format!(
        "{{\"t\": {t:.6}, \"addr\": {}, \"args\": [",
        Value::String(message.addr.clone())
    );
    for (i, a) in message.args.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        match a {
            OscType::Int(v) => s.push_str(&v.to_string()),
            OscType::Long(v) => s.push_str(&v.to_string()),
            OscType::Float(v) if v.is_finite() => s.push_str(&format!("{v:?}")),
            OscType::Double(v) if v.is_finite() => s.push_str(&format!("{v:?}")),
            OscType::String(v) => s.push_str(&Value::String(v.clone()).to_string()),
            OscType::Bool(v) => s.push_str(&v.to_string()),
            _ => s.push_str("null"),
        }
    }
    s.push_str("]}");
    s
}

/// Appends lines to a log, flushing each so that a crash loses nothing already heard.
pub struct LogWriter {
    out: std::io::BufWriter<std::fs::File>,
}

impl LogWriter {
    /// Opens `path` for appending (an earlier run's log is moved aside first, by `play`), so a
    /// rotation that truncates the file under the engine leaves no hole.
    pub fn create(path: &Path) -> Result<Self, LogError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| LogError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            out: std::io::BufWriter::new(file),
        })
    }

    pub fn write(&mut self, t: f64, message: &OscMessage) -> std::io::Result<()> {
        writeln!(self.out, "{}", format_line(t, message))?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = OscMessage {
            addr: "/roomscore/mood".into(),
            args: vec![OscType::Float(0.8), OscType::Float(-1.0)],
        };
        let line = format_line(2.5, &m);
        assert_eq!(
            line,
            r#"{"t": 2.500000, "addr": "/roomscore/mood", "args": [0.8, -1.0]}"#
        );
        let back = parse_line(&line).unwrap();
        assert_eq!(back.t, 2.5);
        assert_eq!(back.message, m);
        let ints = parse_line(r#"{"t": 1, "addr": "/roomscore/note", "args": [60, 100]}"#).unwrap();
        assert_eq!(ints.message.args, vec![OscType::Int(60), OscType::Int(100)]);
    }

    #[test]
    fn bad_lines_say_what() {
        assert!(parse_line("{").unwrap_err().starts_with("not JSON"));
        assert!(parse_line(r#"{"t": -1, "addr": "/a"}"#)
            .unwrap_err()
            .contains("-1"));
        assert!(parse_line(r#"{"t": 1, "addr": "/a", "argz": []}"#)
            .unwrap_err()
            .contains("argz"));
        assert!(parse_line(r#"{"t": 1, "addr": "/a", "args": [[1]]}"#)
            .unwrap_err()
            .contains("args[0]"));
    }

    #[test]
    fn read_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("in.jsonl");
        std::fs::write(
            &p,
            "{\"t\": 1.0, \"addr\": \"/roomscore/movement\", \"args\": [0.5]}\n\n{\"t\": 0.5, \"addr\": \"/roomscore/tempo\", \"args\": [90]}\nnope\n",
        )
        .unwrap();
        let err = read(&p).unwrap_err().to_string();
        assert!(
            err.ends_with(":4: not JSON: expected ident at line 1 column 2"),
            "{err}"
        );
        std::fs::write(
            &p,
            "{\"t\": 1.0, \"addr\": \"/roomscore/movement\", \"args\": [0.5]}\n{\"t\": 0.5, \"addr\": \"/roomscore/tempo\", \"args\": [90]}\n",
        )
        .unwrap();
        let msgs = read(&p).unwrap();
        assert_eq!(msgs[0].message.addr, "/roomscore/tempo");
    }
}
