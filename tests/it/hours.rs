//! Opening hours, applied live against the box's clock: `TZ=UTC` and hours placed around the
//! current minute make the engine start closed (silent) or open (playing), as a kiosk booted
//! at night or in the morning would.

use std::time::{SystemTime, UNIX_EPOCH};

use super::common::*;

fn scene_with_hours(dir: &std::path::Path, open: u32, close: u32) -> std::path::PathBuf {
    let hhmm = |m: u32| format!("{:02}:{:02}", (m % 1440) / 60, m % 60);
    let text = std::fs::read_to_string(scene("performer")).unwrap()
        + &format!(
            "\n[hours]\nopen = \"{}\"\nclose = \"{}\"\noutside = \"silent\"\nfade = 0.5\n",
            hhmm(open),
            hhmm(close)
        );
    let path = dir.join(format!("hours-{open}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Peak level of a recording after its first second (a closed scene starts at silence, with
/// no fade from full volume).
fn peak_after_first_second(args: &[&str]) -> (f32, String) {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.wav");
    let mut all = vec!["--output", "null"];
    all.extend_from_slice(args);
    let stderr = play_recorded(&rec, "3", &all, &[("TZ", "UTC")]);
    let (spec, samples) = read_wav(&rec);
    let from = spec.sample_rate as usize * spec.channels as usize;
    let peak = samples[from..].iter().fold(0f32, |m, s| m.max(s.abs()));
    (peak, stderr)
}

#[test]
fn opening_hours_silence_a_closed_room_and_let_an_open_one_play() {
    let minute = (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
        % 1440) as u32;
    let dir = tempfile::tempdir().unwrap();

    // Opens in two hours: closed now.
    let closed = scene_with_hours(dir.path(), minute + 120, minute + 180);
    let (peak, stderr) = peak_after_first_second(&["--scene", closed.to_str().unwrap()]);
    assert!(stderr.contains("closed at"), "{stderr}");
    assert!(peak < 1e-4, "a closed room played at peak {peak}");

    // Opened an hour ago, closes in an hour: open now.
    let open = scene_with_hours(dir.path(), minute + 1440 - 60, minute + 60);
    let (peak, stderr) = peak_after_first_second(&["--scene", open.to_str().unwrap()]);
    assert!(stderr.contains("open at"), "{stderr}");
    assert!(peak > 1e-3, "an open room was silent (peak {peak})");
}
