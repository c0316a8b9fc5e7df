//! `play` against a JACK dummy server, paced in real time, with what reaches the playback ports
//! captured by `jack_capture`: through cpal's JACK host, through its ALSA host bridged to JACK by
//! alsa-plugins' `jack` PCM, and with the server going away and coming back under a running
//! engine. Each test runs its own named server so it neither needs nor disturbs another.

use std::process::Command;
use std::time::Duration;

use super::common::*;
use super::jackd::*;

/// How many of four windows of the recording (from half a second in: the first callbacks run
/// before the ports are connected) appear bit for bit in the capture.
fn windows_found(recorded: &[f32], cap: &[f32]) -> usize {
    [0.5, 1.0, 1.5, 2.0]
        .iter()
        .filter(|&&at| {
            let k = ((at * 48_000.0) as usize) * 2;
            let window = &recorded[k..k + 2 * 1024];
            assert!(window.iter().any(|s| s.abs() > 1e-4), "sound at {at} s");
            appears_in(cap, window)
        })
        .count()
}

/// Plays three seconds into the server through `args`, and checks that what the engine recorded
/// reached the playback ports unchanged. An xrun on a loaded machine can cut one window, so
/// three of four must be found.
fn plays_bit_exact_through(jack: &Jack, args: &[&str], env: &[(&str, &str)], expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let captured = dir.path().join("capture.wav");
    let rec = dir.path().join("rec.wav");
    let capture = jack.capture(&captured, 6);
    std::thread::sleep(Duration::from_millis(500));
    let mut all = vec!["--buffer", "256"];
    all.extend_from_slice(args);
    let mut env = env.to_vec();
    env.push(("JACK_DEFAULT_SERVER", &jack.name));
    let stderr = play_recorded(&rec, "3", &all, &env);
    assert!(stderr.contains(expect), "{stderr}");
    Jack::end_capture(capture);
    let cap = float_data_chunk(&std::fs::read(&captured).unwrap());
    let (_, recorded) = read_wav(&rec);
    let found = windows_found(&recorded, &cap);
    assert!(
        found >= 3,
        "{found} of 4 windows reached the playback ports bit-exact"
    );
}

#[test]
fn play_through_jack_reaches_the_playback_ports_sample_for_sample() {
    let jack = Jack::start(&server_name("jack"));
    plays_bit_exact_through(&jack, &["--host", "jack"], &[], "JACK device");
}

#[test]
fn play_through_alsa_bridged_to_jack_reaches_the_playback_ports_sample_for_sample() {
    let plugin = Command::new("dpkg")
        .args(["-s", "libasound2-plugins"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        plugin,
        "ALSA's jack PCM is needed (apt-get install libasound2-plugins)"
    );
    let jack = Jack::start(&server_name("alsa-jack"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("alsa")).unwrap();
    // cpal's ALSA host asks for `default`; a private asoundrc makes that JACK's playback ports.
    std::fs::write(
        dir.path().join("alsa/asoundrc"),
        "pcm.!default {\n  type plug\n  slave.pcm \"rsjack\"\n}\n\
         pcm.rsjack {\n  type jack\n  playback_ports { 0 system:playback_1 1 system:playback_2 }\n}\n",
    )
    .unwrap();
    let xdg = dir.path().to_str().unwrap();
    plays_bit_exact_through(
        &jack,
        &["--host", "alsa", "--output", "default"],
        &[("XDG_CONFIG_HOME", xdg)],
        "ALSA device",
    );
}

#[test]
fn a_lost_jack_server_is_survived_on_the_null_output_and_resumed_when_it_returns() {
    let name = server_name("lost");
    let jack = Jack::start(&name);
    let (mut child, port, sock) = jack.play_on_device("40");

    // The card goes away.
    drop(jack);
    let lost = status_until(&sock, port, 10, "on the null output", |s| {
        s.output == "null" && s.device_losses == 1
    });
    // The room keeps playing while there is no device: notes still count up.
    status_until(&sock, port, 15, "notes played with no device", |s| {
        s.notes > lost.notes && s.output == "null"
    });

    // And comes back: the engine finds it without a restart, and its sound reaches the ports.
    let jack = Jack::start(&name);
    status_until(&sock, port, 20, "back on the device", |s| {
        s.output == "device"
    });
    let dir = tempfile::tempdir().unwrap();
    let captured = dir.path().join("after.wav");
    let capture = jack.capture(&captured, 2);
    Jack::end_capture(capture);
    let cap = float_data_chunk(&std::fs::read(&captured).unwrap());
    let peak = cap.iter().fold(0f32, |m, s| m.max(s.abs()));
    assert!(
        peak > 1e-3,
        "silence on the ports after the device came back (peak {peak})"
    );

    let stderr = ended_well(terminate(&mut child));
    assert!(stderr.contains("audio device lost"), "{stderr}");
    assert!(stderr.contains("audio device back"), "{stderr}");
    drop(jack);
}

/// A server that stops answering (as a wedged driver does, without a word) is left for the null
/// output when its callbacks stop. Closing the lost stream then waits on the server, and JACK
/// opens and closes clients under one lock: the engine must not wait with it, but go back to
/// the device once it answers.
#[test]
fn a_frozen_jack_server_is_left_and_rejoined_when_it_answers() {
    let jack = Jack::start(&server_name("frozen"));
    let (mut child, port, sock) = jack.play_on_device("60");

    jack.freeze();
    status_until(&sock, port, 10, "on the null output", |s| {
        s.output == "null" && s.device_losses == 1
    });
    // Tries of the device fall due while the lost stream cannot close.
    child.wait_for_log(15, &["has not answered (closing the lost stream for 5 s)"]);
    jack.thaw();
    status_until(&sock, port, 20, "back on the device", |s| {
        s.output == "device" && s.device_losses == 1
    });

    let stderr = ended_well(terminate(&mut child));
    assert!(stderr.contains("no callback for"), "{stderr}");
    assert!(stderr.contains("audio device back"), "{stderr}");
}

/// A kiosk that boots beside a JACK server that does not answer is not held at the start (for
/// good, or until the service manager kills it): after 5 s it plays on the null output and
/// answers OSC, and it moves to the device once the server answers.
#[test]
fn a_jack_server_frozen_at_the_start_is_joined_when_it_answers() {
    let jack = Jack::start(&server_name("frozen-start"));
    jack.freeze();
    let port = free_port();
    let mut child = jack.play(port, &["--seconds", "60"]);
    child.wait_for_log(
        15,
        &["has not answered (looking for the device at the start for 5 s)"],
    );
    let sock = client();
    let null = status_until(&sock, port, 10, "playing on the null output", |s| {
        s.output == "null"
    });
    status_until(&sock, port, 10, "notes played with no device", |s| {
        s.notes > null.notes
    });
    jack.thaw();
    status_until(&sock, port, 20, "on the device", |s| s.output == "device");

    let stderr = ended_well(terminate(&mut child));
    assert!(stderr.contains("audio device back"), "{stderr}");
}

/// `doctor` and `devices`, run because the room is quiet, name a device that does not answer
/// and go on, instead of hanging with it.
#[test]
fn doctor_and_devices_name_a_jack_server_that_does_not_answer() {
    let jack = Jack::start(&server_name("doctor"));
    jack.freeze();
    // Bounded from outside: one that hangs is killed, and its status then says so.
    let run = |args: &[&str]| {
        let out = std::process::Command::new("timeout")
            .args(["-s", "KILL", "60", bin()])
            .args(args)
            .current_dir(root())
            .env("JACK_DEFAULT_SERVER", &jack.name)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let both = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        (out.status, stdout, both)
    };
    // Not a kiosk's own settings (/etc/roomscore/roomscore.env), where this machine has them.
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("roomscore.env");
    std::fs::write(&env, "").unwrap();
    let (status, stdout, both) = run(&[
        "doctor",
        "--env",
        env.to_str().unwrap(),
        "--host",
        "jack",
        "--scene",
        "scenes/gallery.toml",
        "--osc",
        "127.0.0.1:0",
    ]);
    assert_eq!(status.code(), Some(1), "{status}: {both}");
    assert!(
        stdout.contains(
            "PROBLEM  audio output: the audio device has not answered \
             (looking for the device at the start for 5 s)"
        ),
        "{both}"
    );
    assert!(stdout.contains("1 problem(s) found"), "{both}");

    // Every host is listed, the one that hangs said so.
    let (status, stdout, both) = run(&["devices"]);
    assert!(status.success(), "{status}: {both}");
    let jack_at = stdout.find("host JACK\n    has not answered in 5 s");
    let alsa_at = stdout.find("host ALSA");
    assert!(
        jack_at.is_some() && alsa_at.is_some(),
        "both hosts, JACK's unanswered: {both}"
    );
}

/// A server that hangs while the engine is on it, while the engine opens it, or from before the
/// start, never holds up a stop: the engine fades out and ends by itself, with the server
/// still frozen; a stop during the start is answered at once.
/// (`terminate` kills an engine that has not ended 20 s after SIGTERM, which then fails.)
#[test]
fn a_hung_jack_server_never_holds_up_a_stop() {
    // Frozen under a playing engine, which is told to stop before it sees the stall.
    let jack = Jack::start(&server_name("hung-playing"));
    let (mut child, _, _) = jack.play_on_device("60");
    jack.freeze();
    let stderr = ended_well(terminate(&mut child));
    // On a loaded machine the stall (1.5 s) may be seen before the signal: the stream lost
    // then holds the close instead of the stop.
    assert!(
        stderr.contains("did not close within 2 s of the stop")
            || stderr.contains("no callback for"),
        "{stderr}"
    );
    drop(jack);

    // Frozen as the engine finds it again: the try of the device hangs.
    let name = server_name("hung-opening");
    let jack = Jack::start(&name);
    let (mut child, port, sock) = jack.play_on_device("60");
    drop(jack);
    status_until(&sock, port, 10, "on the null output", |s| {
        s.output == "null"
    });
    let jack = Jack::start(&name);
    jack.freeze();
    // Mostly a try that hangs (the next comes within 8 s); when one fell between the server's
    // start and its freeze, the engine went back to it and waits on the close of the stream it
    // lost again (its stall, 1.5 s, then 5 s).
    child.wait_for_log(
        30,
        &[
            "has not answered (trying the device for 5 s)",
            "has not answered (closing the lost stream for 5 s)",
        ],
    );
    ended_well(terminate(&mut child));
    drop(jack);

    // Frozen before the start, and stopped while the start waits for it: the stop is answered
    // then, before anything plays, not once the wait is over (which would say the device has
    // not answered, and play).
    let jack = Jack::start(&server_name("hung-start"));
    jack.freeze();
    let mut child = jack.play(free_port(), &["--seconds", "60"]);
    wait_for_thread(&mut child, "audio-device", 15);
    let stderr = ended_well(terminate(&mut child));
    assert!(
        stderr.contains("stopped during the start, before anything played"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("has not answered"),
        "the start waited for the device: {stderr}"
    );
}

/// A logged night replayed by `play` on the device gives the samples `render` gives for the
/// same log and seed: two seconds of what reached JACK's playback ports, bit for bit.
#[test]
fn play_replaying_a_log_reaches_the_ports_with_the_samples_render_makes() {
    let jack = Jack::start(&server_name("replay"));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("night.jsonl");
    std::fs::write(
        &log,
        "{\"t\": 0.2, \"addr\": \"/roomscore/movement\", \"args\": [0.9]}\n\
         {\"t\": 0.7, \"addr\": \"/roomscore/mood\", \"args\": [-0.6, 0.8]}\n\
         {\"t\": 1.1, \"addr\": \"/roomscore/note\", \"args\": [76, 110]}\n\
         {\"t\": 1.6, \"addr\": \"/roomscore/tempo\", \"args\": [132.0]}\n\
         {\"t\": 2.3, \"addr\": \"/roomscore/movement\", \"args\": [0.2]}\n",
    )
    .unwrap();
    let rendered = dir.path().join("render.wav");
    render(&[
        "--scene",
        "scenes/performer.toml",
        "--seconds",
        "4",
        "--seed",
        "7",
        "--inputs",
        log.to_str().unwrap(),
        "--out",
        rendered.to_str().unwrap(),
    ]);
    let (_, offline) = read_wav(&rendered);

    let captured = dir.path().join("capture.wav");
    let capture = jack.capture(&captured, 7);
    std::thread::sleep(Duration::from_millis(500));
    let mut child = jack.play(
        free_port(),
        &[
            "--scene",
            "scenes/performer.toml",
            "--seed",
            "7",
            "--inputs",
            log.to_str().unwrap(),
            "--seconds",
            "4",
        ],
    );
    let stderr = ended_well(terminate_after(&mut child, 25));
    assert!(stderr.contains("replaying on JACK device"), "{stderr}");
    Jack::end_capture(capture);
    let cap = float_data_chunk(&std::fs::read(&captured).unwrap());

    // Windows of the render, every quarter second from 0.5 s to 3.5 s, must each appear bit
    // for bit in what reached the ports (JACK connects the ports a moment after the first
    // callbacks, so positions are searched, not assumed). An xrun (this server runs without
    // real-time scheduling, beside other tests) can cut a window: every window missing must be
    // matched by an xrun the engine counted, and most must be there.
    let windows: Vec<usize> = (2..=14).map(|q| q * 48_000 / 4 * 2).collect();
    let found = windows
        .iter()
        .filter(|&&at| {
            let window = &offline[at..at + 2 * 1024];
            appears_in(&cap, window)
        })
        .count();
    assert!(
        offline[windows[0]..].iter().any(|s| s.abs() > 1e-4),
        "the render is silent"
    );
    let xruns = logged_count(&stderr, "xruns=");
    assert!(
        windows.len() - found <= xruns.max(1) && found * 2 > windows.len(),
        "{found} of {} windows of the render reached the ports bit-exact, with {xruns} xruns",
        windows.len()
    );
}

/// Under systemd (`NOTIFY_SOCKET` set), a card that comes back at another rate than the one the
/// engine started at ends play with an error, for the service to start it again at the card's
/// rate, instead of playing on against the null output for good.
#[test]
fn a_device_back_at_another_rate_ends_play_for_a_restart() {
    let name = server_name("rate");
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let _listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    let port = free_port();
    let osc = format!("127.0.0.1:{port}");
    let mut child = spawn_play(
        &[
            "--host",
            "jack",
            "--buffer",
            "256",
            "--osc",
            &osc,
            "--seconds",
            "60",
        ],
        &[
            ("JACK_DEFAULT_SERVER", &name),
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
        ],
    );
    let sock = client();
    status_until(&sock, port, 20, "playing with no device", |s| {
        s.output == "null"
    });
    let jack = Jack::start_at(&name, 44_100);
    let out = terminate_after(&mut child, 40);
    drop(jack);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("offers 44100 Hz, and the engine runs at 48000 Hz")
            && stderr.contains("to be started again at its rate"),
        "{stderr}"
    );
}
