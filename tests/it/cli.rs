//! The command line as an operator meets it: checking scenes, bad input.

use super::common::*;

#[test]
fn shipped_scenes_validate() {
    for name in ["gallery", "performer", "night"] {
        let p = scene(name);
        let out = roomscore(&["check", p.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn malformed_scenes_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(scene("gallery"))
        .unwrap()
        .replace("polyphony = 10", "polyphony = 1000")
        .replace("tempo = 66", "tempo = 66\ntempoo = 3");
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, &text).unwrap();
    let out = roomscore(&["check", p.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Unknown keys are found first (the file does not parse into a scene).
    let line = text.lines().position(|l| l.starts_with("tempoo")).unwrap() + 1;
    assert!(
        err.contains(&format!("bad.toml:{line}:1: unknown field `tempoo`")),
        "{err}"
    );

    let text = text.replace("tempoo = 3\n", "");
    std::fs::write(&p, &text).unwrap();
    let out = roomscore(&["check", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .position(|l| l.contains("polyphony = 1000"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("bad.toml:{line}:13: field `instrument[0].polyphony`: value 1000 is out of range (expected 1 to 64)")),
        "{err}"
    );

    let text = text.replace("samples/air.wav", "samples/missing.wav");
    std::fs::write(&p, &text).unwrap();
    let err =
        String::from_utf8_lossy(&roomscore(&["check", p.to_str().unwrap()]).stderr).into_owned();
    assert!(err.contains("field `layer[0].file`: sample file"), "{err}");
    assert!(err.contains("missing.wav"), "{err}");
}

#[test]
fn render_refuses_bad_input_logs_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("in.jsonl");
    std::fs::write(
        &log,
        "{\"t\": 0.5, \"addr\": \"/roomscore/movement\", \"args\": [0.2]}\n{\"t\": \"soon\", \"addr\": \"/x\"}\n",
    )
    .unwrap();
    let out = roomscore(&[
        "render",
        "--seconds",
        "1",
        "--inputs",
        log.to_str().unwrap(),
        "--out",
        dir.path().join("x.wav").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in.jsonl:2: field \"t\" must be a number"),
        "{err}"
    );
}

#[test]
fn doctor_names_each_problem_and_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[scene]\nname = \"x\"\ntempo = 9999\n").unwrap();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let good = scene("gallery");
    let out = roomscore(&[
        "doctor",
        "--osc",
        &port,
        "--scene",
        bad.to_str().unwrap(),
        "--scene",
        good.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("PROBLEM  OSC port: {port}")),
        "{text}"
    );
    assert!(
        text.contains("bad.toml:3:9: field `scene.tempo`: value 9999"),
        "{text}"
    );
    assert!(
        text.contains("ok       scene:") && text.contains("(gallery)"),
        "{text}"
    );
    assert!(text.contains("fix:"), "{text}");
}

#[test]
fn doctor_times_a_model_scenes_composer_against_its_tempo() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let out = roomscore(&[
        "doctor",
        "--osc",
        &port,
        "--scene",
        scene("chorale").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    // Ok or a problem, as this machine's speed has it; either way the figures are there.
    let line = text
        .lines()
        .find(|l| l.contains("composer pace (chorale): a step in "))
        .unwrap_or_else(|| panic!("no composer pace line:\n{text}"));
    let number_after = |label: &str| -> f64 {
        let rest = &line[line.find(label).unwrap_or_else(|| panic!("{line}")) + label.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap();
        rest[..end].parse().unwrap()
    };
    let (median, slowest) = (number_after("a step in "), number_after("slowest "));
    assert!(median > 0.0 && median <= slowest, "{line}");
    // A 16th at 79.2 BPM: the chorale's 66 BPM, which its arousal mapping takes up to 1.2x.
    assert!(
        line.contains(
            "against 189 ms a step at 79 BPM, the fastest the scene's tempo mapping reaches from its 66"
        ),
        "{line}"
    );
    assert!(line.contains("median of 64 with a full context"), "{line}");
    // Half a step at the tempo it names is the median: 7.5 s / median.
    if median * 1e-3 < 7.5 / 300.0 {
        assert!(
            line.ends_with("it keeps up at any tempo the engine plays (to 300 BPM)"),
            "{line}"
        );
    } else {
        let bpm = number_after("it keeps up to ");
        assert!(
            (bpm - 7.5 / (median * 1e-3)).abs() <= 0.01 * bpm + 1.0,
            "{line}"
        );
    }
}

/// On a kiosk, doctor checks what the service runs: the settings in its env file, and the ONNX
/// Runtime named there.
#[test]
fn doctor_reads_the_service_settings() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[scene]\nname = \"x\"\ntempo = 9999\n").unwrap();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    // The wheel's library, under a name of its own, where the repository has one.
    let wheel = std::fs::read_dir(root().join(".venv/lib"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| {
            d.path()
                .join("site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1")
        })
        .find(|p| p.exists());
    let ort = dir.path().join("libonnxruntime.so.1.31.1");
    if let Some(w) = &wheel {
        std::os::unix::fs::symlink(w, &ort).unwrap();
    }
    let env = dir.path().join("roomscore.env");
    std::fs::write(
        &env,
        format!(
            "# the service's\nROOMSCORE_SCENE={}\nROOMSCORE_OSC={port}\nORT_DYLIB_PATH={}\noops\n",
            bad.display(),
            ort.display()
        ),
    )
    .unwrap();
    let out = roomscore(&["doctor", "--env", env.to_str().unwrap()]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        format!("ok       service settings: read from {}", env.display()),
        "line 5: \"oops\" is not KEY=VALUE".to_string(),
        format!("PROBLEM  OSC port: {port}"),
        "bad.toml:3:9: field `scene.tempo`: value 9999".to_string(),
    ] {
        assert!(text.contains(&expected), "{expected:?} in:\n{text}");
    }
    if wheel.is_some() {
        let runtime = text
            .lines()
            .find(|l| l.contains("model runtime"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            runtime.contains(&ort.display().to_string()) && runtime.contains("ORT_DYLIB_PATH"),
            "{runtime}"
        );
    }
}

#[test]
fn a_sample_rate_out_of_range_is_refused_before_anything_plays() {
    for cmd in [
        &["play", "--output", "null", "--sample-rate", "0"][..],
        &[
            "render",
            "--seconds",
            "1",
            "--out",
            "/tmp/never.wav",
            "--sample-rate",
            "500000",
        ][..],
    ] {
        let out = roomscore(cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?}: {err}");
        assert!(
            err.contains("--sample-rate") && err.contains("8000..=384000"),
            "{cmd:?}: {err}"
        );
    }
}
