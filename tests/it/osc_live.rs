//! A running `play`, steered by real OSC clients over real UDP sockets: our own encoder, and
//! liblo's `oscsend`. What it did is read back through `/roomscore/status` and the recording.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use nannou_osc::rosc::OscType;

use super::common::*;

#[test]
fn osc_steers_a_running_engine() {
    assert!(
        command_exists("oscsend"),
        "liblo's oscsend is needed (apt-get install liblo-tools)"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let rec = dir.path().join("live.wav");
    let log = dir.path().join("live.jsonl");
    let osc = format!("127.0.0.1:{port}");
    let mut child = spawn_play(
        &[
            "--output",
            "null",
            "--osc",
            &osc,
            "--record",
            rec.to_str().unwrap(),
            "--log-inputs",
            log.to_str().unwrap(),
        ],
        &[],
    );
    let started = Instant::now();
    let sock = client();
    let s0 = wait_for_status(&sock, port);
    assert_eq!(s0.scene, "gallery");
    assert_eq!(s0.source, "rules");

    // Notes per second over 5 s, once the mapping's 1.5 s smoothing has followed `movement`.
    let notes_per_second = |movement: f32, settle: u64| {
        send(
            &sock,
            port,
            "/roomscore/movement",
            vec![OscType::Float(movement)],
        );
        std::thread::sleep(Duration::from_secs(settle));
        let a = status(&sock, port).unwrap();
        std::thread::sleep(Duration::from_secs(5));
        let b = status(&sock, port).unwrap();
        (b.notes - a.notes) as f64 / 5.0
    };
    // The room is still, then visitors move: the music gets busier.
    let still = notes_per_second(0.0, 1);
    let busy = notes_per_second(1.0, 4);
    assert!(
        busy > 2.0 * still.max(0.2),
        "notes/s: still {still:.2}, busy {busy:.2}"
    );

    // Garbage, NaN, a wrong type and an unknown address are counted, not fatal.
    let d = status(&sock, port).unwrap();
    sock.send_to(b"\x00\x01garbage", ("127.0.0.1", port))
        .unwrap();
    send(
        &sock,
        port,
        "/roomscore/movement",
        vec![OscType::Float(f32::NAN)],
    );
    send(
        &sock,
        port,
        "/roomscore/mood",
        vec![OscType::String("happy".into())],
    );
    send(&sock, port, "/roomscore/nothing", vec![]);
    send(
        &sock,
        port,
        "/roomscore/note",
        vec![OscType::Int(76), OscType::Int(100)],
    );
    std::thread::sleep(Duration::from_millis(300));
    let e = status(&sock, port).unwrap();
    assert_eq!(e.invalid - d.invalid, 4);
    assert_eq!(e.dropped, 0);
    // Underruns are not asserted here: this binary's tests share two cores with each other and
    // with their JACK servers, and the null output counts a late wake-up as an xrun.
    // tests/flood.rs holds hostile input to zero xruns with the machine to itself.

    // A performer changes scene and tempo with liblo's oscsend.
    let oscsend = |args: &[&str]| {
        let ok = std::process::Command::new("oscsend")
            .args(["127.0.0.1", &port.to_string()])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "oscsend {args:?}");
    };
    oscsend(&["/roomscore/scene", "s", "performer"]);
    oscsend(&["/roomscore/tempo", "f", "132"]);
    std::thread::sleep(Duration::from_millis(500));
    let f = status(&sock, port).unwrap();
    assert_eq!(f.scene, "performer");
    assert!((f.tempo - 132.0).abs() < 0.01, "tempo {}", f.tempo);
    oscsend(&["/roomscore/scene", "s", "no_such_scene"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        status(&sock, port).unwrap().scene,
        "performer",
        "a bad scene keeps the old one"
    );

    let played = started.elapsed().as_secs_f64();
    let stderr = ended_well(terminate(&mut child));
    assert!(stderr.contains("no_such_scene.toml"), "{stderr}");

    // The recording is a valid WAV as long as the session, and it is not silent.
    let (spec, samples) = read_wav(&rec);
    assert_eq!((spec.channels, spec.sample_rate), (2, 48_000));
    let secs = samples.len() as f64 / 2.0 / 48_000.0;
    assert!(
        secs > played - 1.0 && secs < played + 2.5,
        "recorded {secs:.1} s of {played:.1} s"
    );
    let peak = samples.iter().fold(0f32, |m, s| m.max(s.abs()));
    assert!(peak > 0.02 && peak <= 1.0, "peak {peak}");
    // The fade-out leaves the last samples quiet.
    let tail = &samples[samples.len() - 2000..];
    assert!(tail.iter().all(|s| s.abs() < 0.01), "ends faded out");

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(r#""addr": "/roomscore/movement", "args": [1.0]"#),
        "{logged}"
    );
    assert!(
        logged.contains(r#""addr": "/roomscore/note", "args": [76, 100]"#),
        "{logged}"
    );
    assert!(logged.contains(r#""args": ["performer"]"#), "{logged}");
    assert!(!logged.contains("NaN"), "{logged}");
}

#[test]
fn a_taken_osc_port_is_a_clear_error_before_any_sound() {
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = roomscore(&["play", "--output", "null", "--osc", &addr, "--seconds", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

#[test]
fn play_replays_an_input_log_on_its_times() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("night.jsonl");
    std::fs::write(
        &log,
        "{\"t\": 0.3, \"addr\": \"/roomscore/scene\", \"args\": [\"no-such-scene\"]}\n\
         {\"t\": 0.5, \"addr\": \"/roomscore/scene\", \"args\": [\"performer\"]}\n\
         {\"t\": 1.0, \"addr\": \"/roomscore/tempo\", \"args\": [140.0]}\n\
         {\"t\": 1.2, \"addr\": \"/roomscore/note\", \"args\": [79, 110]}\n\
         {\"t\": 30.0, \"addr\": \"/roomscore/tempo\", \"args\": [60.0]}\n",
    )
    .unwrap();
    let port = free_port();
    let osc = format!("127.0.0.1:{port}");
    let mut child = spawn_play(
        &[
            "--output",
            "null",
            "--osc",
            &osc,
            "--inputs",
            log.to_str().unwrap(),
        ],
        &[],
    );
    let sock = client();
    let first = wait_for_status(&sock, port);
    std::thread::sleep(Duration::from_secs(3));
    let s = status(&sock, port).unwrap();
    let out = terminate(&mut child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        s.scene, "performer",
        "the scene change at 0.5 s was replayed"
    );
    assert!(
        (s.tempo - 140.0).abs() < 0.01,
        "tempo {} (the change at 30 s is still to come)",
        s.tempo
    );
    assert!(s.notes > first.notes);
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the fault it injects is compiled into debug builds only"
)]
fn a_composing_thread_that_dies_ends_the_engine_with_an_error_and_a_whole_recording() {
    // Not a silent room with a watchdog still fed: the engine fades, closes the recording and
    // exits with an error, for systemd (`Restart=always`) to start it again. Live, the composer
    // thread composes; in a replay (`--inputs`), the replay thread.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("night.jsonl");
    std::fs::write(
        &log,
        "{\"t\": 0.5, \"addr\": \"/roomscore/movement\", \"args\": [0.9]}\n",
    )
    .unwrap();
    for (thread, inputs) in [("composer", None), ("replay", Some(&log))] {
        let rec = dir.path().join(format!("{thread}.wav"));
        let osc = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "--output",
            "null",
            "--osc",
            &osc,
            "--seconds",
            "60",
            "--record",
            rec.to_str().unwrap(),
        ];
        if let Some(log) = inputs {
            args.extend(["--inputs", log.to_str().unwrap()]);
        }
        let started = Instant::now();
        let mut child = spawn_play(&args, &[("ROOMSCORE_TEST_COMPOSER_PANIC_AFTER", "3")]);
        let out = terminate_after(&mut child, 30);
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{thread}: {stderr}");
        assert!(
            took < Duration::from_secs(30),
            "{thread}: it played on: {stderr}"
        );
        assert!(
            stderr.contains(&format!("the {thread} thread stopped while playing")),
            "{stderr}"
        );
        // What was played before: a whole file of at least the 3 s before, with sound in it.
        let (spec, samples) = read_wav(&rec);
        let seconds = samples.len() as f64 / spec.channels as f64 / spec.sample_rate as f64;
        assert!(seconds >= 3.0, "{thread}: {seconds:.2} s recorded");
        assert!(
            samples.iter().any(|s| s.abs() > 1e-3),
            "{thread}: nothing was heard"
        );
    }
}

/// systemd starts the engine again after a fault with the same `--record` and `--log-inputs`:
/// the night before the fault is kept beside the new run's files, not overwritten.
#[test]
fn a_restarted_engine_keeps_the_earlier_runs_recording_and_input_log() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("night.wav");
    let log = dir.path().join("night.jsonl");
    for movement in [0.25f32, 0.75] {
        let port = free_port();
        let osc = format!("127.0.0.1:{port}");
        let mut child = spawn_play(
            &[
                "--output",
                "null",
                "--osc",
                &osc,
                "--seconds",
                "3",
                "--record",
                rec.to_str().unwrap(),
                "--log-inputs",
                log.to_str().unwrap(),
            ],
            &[],
        );
        let sock = client();
        wait_for_status(&sock, port);
        send(
            &sock,
            port,
            "/roomscore/movement",
            vec![OscType::Float(movement)],
        );
        let out = terminate_after(&mut child, 25);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 4, "{names:?}");
    let earlier = |ext: &str| {
        let name = names
            .iter()
            .find(|n| n.starts_with("night.") && n.ends_with(&format!("Z.{ext}")))
            .unwrap_or_else(|| panic!("no earlier .{ext} in {names:?}"));
        dir.path().join(name)
    };
    let first_log = std::fs::read_to_string(earlier("jsonl")).unwrap();
    let second_log = std::fs::read_to_string(&log).unwrap();
    assert!(first_log.contains("[0.25]"), "{first_log}");
    assert!(second_log.contains("[0.75]"), "{second_log}");
    assert!(!second_log.contains("[0.25]"), "{second_log}");
    for wav in [earlier("wav"), rec] {
        let (spec, samples) = read_wav(&wav);
        let seconds = samples.len() as f64 / spec.channels as f64 / spec.sample_rate as f64;
        assert!(seconds >= 3.0, "{}: {seconds:.2} s", wav.display());
    }
}

/// An input log that cannot be written is found before any sound: nothing is recorded.
#[test]
fn an_input_log_that_cannot_be_written_is_an_error_before_any_sound() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("never.wav");
    let log = dir.path().join("no-such-folder").join("inputs.jsonl");
    let osc = format!("127.0.0.1:{}", free_port());
    let out = roomscore(&[
        "play",
        "--output",
        "null",
        "--osc",
        &osc,
        "--seconds",
        "5",
        "--record",
        rec.to_str().unwrap(),
        "--log-inputs",
        log.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("{}: cannot write input log", log.display())),
        "{err}"
    );
    assert!(!rec.exists(), "a recording was begun: {err}");
}

/// SIGHUP reloads the file of the scene that plays (the one OSC switched to, not `--scene`),
/// refuses a broken one and plays on, and takes an edited one.
#[test]
fn sighup_reloads_the_scene_that_plays() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(root().join("scenes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    std::os::unix::fs::symlink(root().join("scenes/samples"), dir.path().join("samples")).unwrap();
    let port = free_port();
    let osc = format!("127.0.0.1:{port}");
    let performer = dir.path().join("performer.toml");
    let mut child = spawn_play(
        &[
            "--scene",
            performer.to_str().unwrap(),
            "--output",
            "null",
            "--osc",
            &osc,
        ],
        &[],
    );
    let sock = client();
    assert_eq!(wait_for_status(&sock, port).scene, "performer");
    let scene_after = |sock: &UdpSocket| {
        std::thread::sleep(Duration::from_millis(700));
        status(sock, port).expect("status").scene
    };
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    send(
        &sock,
        port,
        "/roomscore/scene",
        vec![OscType::String("night".into())],
    );
    assert_eq!(scene_after(&sock), "night");
    hup();
    assert_eq!(scene_after(&sock), "night", "SIGHUP went back to --scene");

    let night = dir.path().join("night.toml");
    let text = std::fs::read_to_string(&night).unwrap();
    std::fs::write(&night, text.replace("tempo = 48", "tempo = 9999")).unwrap();
    hup();
    assert_eq!(scene_after(&sock), "night", "a broken file is refused");
    std::fs::write(
        &night,
        text.replace("name = \"night\"", "name = \"night-edited\""),
    )
    .unwrap();
    hup();
    assert_eq!(scene_after(&sock), "night-edited", "the edit is taken");

    let stderr = ended_well(terminate(&mut child));
    assert!(
        stderr.contains("night.toml") && stderr.contains("keeping the scene that plays"),
        "the refusal names the file: {stderr}"
    );
}

/// A bundle whose tag is already past is applied as it arrives (the sender's clock behind, or a
/// bundle stamped "now" that came late), so the log puts it where it was applied: a replay then
/// applies the inputs in the order the room did.
#[test]
fn a_late_bundle_is_logged_when_it_was_applied() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("late.jsonl");
    let (mut child, port, sock) = play_logging_to(&log);
    wait_for_status(&sock, port);
    send(&sock, port, "/roomscore/tempo", vec![OscType::Float(200.0)]);
    std::thread::sleep(Duration::from_millis(300));
    // The scene's mappings scale the tempo the status reports.
    let fast = status(&sock, port).unwrap().tempo;
    send_bundle_at(
        &sock,
        port,
        std::time::SystemTime::now() - Duration::from_secs(10),
        "/roomscore/tempo",
        vec![OscType::Float(90.0)],
    );
    std::thread::sleep(Duration::from_millis(300));
    let s = status(&sock, port).unwrap();
    let out = terminate(&mut child);
    assert!(out.status.success());
    assert!(
        (s.tempo / fast - 0.45).abs() < 0.01,
        "live, the late 90 came last: {} after {fast}",
        s.tempo
    );
    let replayed = roomscore::input::log::read(&log).unwrap();
    let tempi: Vec<_> = replayed
        .iter()
        .map(|m| format!("{:?}", m.message.args))
        .collect();
    assert_eq!(tempi, ["[Float(200.0)]", "[Float(90.0)]"], "{replayed:?}");
}

/// A composer stuck inside a call (a model that never returns) leaves the audio clock moving;
/// the watchdog must go unfed anyway, so that systemd restarts the engine.
#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the fault it injects is compiled into debug builds only"
)]
fn a_hung_composer_stops_the_watchdog_pings() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let server = UnixDatagram::bind(&path).unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let osc = format!("127.0.0.1:{}", free_port());
    let mut child = spawn_play(
        &["--output", "null", "--osc", &osc],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
            ("ROOMSCORE_TEST_COMPOSER_HANG_AFTER", "3"),
        ],
    );
    // Pings every 0.5 s; the hang at 3 s is seen once the composer has not turned for the
    // watchdog's whole second, so the last ping comes before 4.5 s.
    let mut ready = None;
    let mut pings = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && ready.is_none_or(|r: Instant| r.elapsed().as_secs() < 8) {
        if let Ok(n) = server.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]);
            if msg.contains("READY=1") && ready.is_none() {
                ready = Some(Instant::now());
            }
            if let (true, Some(r)) = (msg.contains("WATCHDOG=1"), ready) {
                pings.push(r.elapsed().as_secs_f64());
            }
        }
    }
    // Stopped as systemd stops it: it does not wait on the stuck thread for ever.
    let asked = Instant::now();
    let out = terminate(&mut child);
    let took = asked.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        took < Duration::from_secs(15),
        "took {took:?} to stop: {stderr}"
    );
    assert!(
        stderr.contains("the composer thread did not stop when asked"),
        "{stderr}"
    );
    assert!(ready.is_some(), "never ready: {stderr}");
    assert!(pings.len() >= 3, "pings while whole: {pings:?}");
    let last = pings.last().copied().unwrap_or(0.0);
    assert!(last < 5.0, "still pinging at {last:.1} s: {pings:?}");
    assert!(
        stderr.contains("the composer thread has not gone round its loop"),
        "{stderr}"
    );
}

/// A sender that floods the engine with bundles for later: at most `MAX_SCHEDULED` wait, the
/// rest are dropped and counted, and the input log holds exactly those that were kept (a replay
/// must not hear what the room did not).
#[test]
fn bundles_for_later_beyond_the_limit_are_dropped_counted_and_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("flood.jsonl");
    let (mut child, port, sock) = play_logging_to(&log);
    let before = wait_for_status(&sock, port);
    let in_30_s = std::time::SystemTime::now() + Duration::from_secs(30);
    let sent = 6_000;
    for i in 0..sent {
        send_bundle_at(
            &sock,
            port,
            in_30_s,
            "/roomscore/movement",
            vec![OscType::Float((i % 100) as f32 / 100.0)],
        );
        // Slow enough that the kernel's socket buffer loses none.
        if i % 20 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let s = status(&sock, port).unwrap();
    let out = terminate(&mut child);
    assert!(out.status.success());
    let dropped = (s.dropped - before.dropped) as usize;
    let logged = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(
        logged <= roomscore::input::osc::MAX_SCHEDULED + 4_096,
        "logged {logged}"
    );
    assert!(
        dropped > 0 && logged > 0,
        "dropped {dropped}, logged {logged}"
    );
    assert_eq!(
        logged + dropped,
        sent,
        "every message logged or dropped, none both"
    );
}

/// A `play` on the null output that logs its inputs to `log`, its OSC port, and a client.
fn play_logging_to(log: &std::path::Path) -> (Playing, u16, UdpSocket) {
    let port = free_port();
    let osc = format!("127.0.0.1:{port}");
    let child = spawn_play(
        &[
            "--output",
            "null",
            "--osc",
            &osc,
            "--log-inputs",
            log.to_str().unwrap(),
        ],
        &[],
    );
    (child, port, client())
}
