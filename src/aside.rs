//! The files `play` writes for a night (`--record`, `--log-inputs`) are named on its command
//! line, and systemd starts the engine again after any fault with the same line: a run that
//! opened them afresh would overwrite the night that led to the fault. An earlier run's file is
//! moved aside instead, under the time it was last written.

use std::path::{Path, PathBuf};

/// Moves an earlier run's file at `path` aside, to `<stem>.<UTC time last written>.<ext>` in
/// the same folder, and returns where it went. Nothing is moved when there is nothing to lose:
/// no file, an empty one, or no regular file at all (`/dev/null`, a FIFO).
pub fn move_aside(path: &Path) -> std::io::Result<Option<PathBuf>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_file() || meta.len() == 0 {
        return Ok(None);
    }
    let written = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let stamp = utc_stamp(written);
    // Two runs that ended within the same second (a crash loop) keep a file each. A link is
    // refused where the name is taken (a rename would replace that file), so nothing kept is
    // ever overwritten, whoever else writes into the folder.
    for n in 0.. {
        let again = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        let to = path.with_file_name(format!("{stem}.{stamp}{again}{ext}"));
        match std::fs::hard_link(path, &to) {
            Ok(()) => {
                // Not kept under two names if it stays where it was.
                return match std::fs::remove_file(path) {
                    Ok(()) => Ok(Some(to)),
                    Err(e) => {
                        let _ = std::fs::remove_file(&to);
                        Err(e)
                    }
                };
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            // A file system without links (a FAT stick): a rename to a name not taken yet.
            Err(_) if !to.exists() => {
                std::fs::rename(path, &to)?;
                return Ok(Some(to));
            }
            Err(_) => continue,
        }
    }
    unreachable!("some name is free")
}

/// `20261129T093000Z` for seconds since the epoch, in UTC: sortable to the second, and the same
/// whatever the kiosk's time zone.
fn utc_stamp(secs: u64) -> String {
    let days = secs / 86_400;
    let rest = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        // 2000-02-29 (a leap day of a century year) and 2026-11-29 09:30:05.
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_795_944_605), "20261129T093005Z");
        assert_eq!(utc_stamp(4_102_444_799), "20991231T235959Z");
        assert_eq!(utc_stamp(4_107_542_399), "21000228T235959Z");
    }

    #[test]
    fn an_earlier_file_is_kept_and_nothing_else_moves() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("inputs.jsonl");
        assert_eq!(move_aside(&log).unwrap(), None, "no file");
        std::fs::write(&log, "").unwrap();
        assert_eq!(move_aside(&log).unwrap(), None, "an empty file");
        assert!(log.exists());
        assert_eq!(move_aside(Path::new("/dev/null")).unwrap(), None);

        // Two runs that ended within the same second each keep a file of their own.
        let ended = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_944_605);
        let mut kept = Vec::new();
        for night in ["first night\n", "second night\n"] {
            std::fs::write(&log, night).unwrap();
            let f = std::fs::File::options().write(true).open(&log).unwrap();
            f.set_modified(ended).unwrap();
            drop(f);
            let to = move_aside(&log).unwrap().expect("moved");
            assert!(!log.exists());
            assert_eq!(std::fs::read_to_string(&to).unwrap(), night);
            kept.push(to.file_name().unwrap().to_string_lossy().into_owned());
        }
        assert_eq!(
            kept,
            [
                "inputs.20261129T093005Z.jsonl",
                "inputs.20261129T093005Z-1.jsonl"
            ]
        );
    }
}
