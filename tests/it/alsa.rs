//! cpal's real ALSA path with no sound card: a private asoundrc (found through
//! `XDG_CONFIG_HOME`) routes the default PCM into ALSA's `file` plugin, so the bytes cpal
//! handed to ALSA land in a file, and must be the samples the graph produced.

use super::common::*;

#[test]
fn play_through_alsa_writes_exactly_what_the_graph_produced() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("capture.raw");
    let xdg = private_asoundrc(
        dir.path(),
        &format!(
            "pcm.!default {{\n  type file\n  slave.pcm \"null\"\n  file \"{}\"\n  format \"raw\"\n}}\n",
            raw.display()
        ),
    );
    let rec = dir.path().join("rec.wav");
    let port = free_port().to_string();
    let osc = format!("127.0.0.1:{port}");
    let mut child = spawn_play(
        &[
            "--host",
            "alsa",
            "--output",
            "default",
            "--buffer",
            "256",
            "--osc",
            &osc,
            "--record",
            rec.to_str().unwrap(),
            "--seconds",
            "1",
        ],
        &[("XDG_CONFIG_HOME", &xdg)],
    );
    let stderr = ended_well(terminate_after(&mut child, 25));
    assert!(
        stderr.contains("ALSA device"),
        "played through ALSA: {stderr}"
    );
    assert!(!stderr.contains("null output"), "{stderr}");

    let bytes = std::fs::read(&raw).expect("ALSA's file plugin wrote the capture");
    let captured: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let (_, recorded) = read_wav(&rec);
    // The null PCM takes samples as fast as they come, so compare the first second of both:
    // the recorder's queue holds four seconds, so that much is never missing from it.
    let n = 48_000 * 2;
    assert!(
        captured.len() >= n && recorded.len() >= n,
        "{} / {}",
        captured.len(),
        recorded.len()
    );
    let differing = captured[..n]
        .iter()
        .zip(&recorded[..n])
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "bit-exact");
    assert!(recorded[..n].iter().any(|s| s.abs() > 1e-4), "not silence");
}

/// A card that is gone: alsa-lib's own error lines (several on every try, one try a second or
/// so) go to the log at debug level, not onto stderr and into the journal between the
/// engine's lines.
#[test]
fn alsa_libs_errors_about_a_missing_card_go_to_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let xdg = private_asoundrc(
        dir.path(),
        "pcm.!default {\n  type hw\n  card \"NoSuchCard\"\n}\n",
    );
    let osc = format!("127.0.0.1:{}", free_port());
    let mut child = spawn_play(
        &[
            "--host",
            "alsa",
            "--output",
            "default",
            "--osc",
            &osc,
            "--seconds",
            "3",
        ],
        &[("XDG_CONFIG_HOME", &xdg), ("RUST_LOG", "debug")],
    );
    let stderr = ended_well(terminate_after(&mut child, 25));
    assert!(stderr.contains("null output"), "{stderr}");
    assert!(!stderr.contains("ALSA lib"), "{stderr}");
    assert!(
        stderr.contains("alsa-lib: snd_config_get_card: Cannot get card index for NoSuchCard"),
        "{stderr}"
    );
}

/// Writes `conf` as the asoundrc alsa-lib finds through `XDG_CONFIG_HOME` set to `dir`, and
/// returns that value.
fn private_asoundrc(dir: &std::path::Path, conf: &str) -> String {
    std::fs::create_dir_all(dir.join("alsa")).unwrap();
    std::fs::write(dir.join("alsa/asoundrc"), conf).unwrap();
    dir.to_str().unwrap().to_string()
}
