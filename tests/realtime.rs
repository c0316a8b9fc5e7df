//! The audio callback obeys the real-time rules: with every part in play (voices, stealing,
//! sample layers through kira, a scene swap, fades, performer notes), it never allocates or
//! frees. This binary swaps in assert_no_alloc's allocator, so any allocation inside
//! `assert_no_alloc` is counted.

use std::path::Path;

use assert_no_alloc::{assert_no_alloc, violation_count, AllocDisabler};
use roomscore::audio::{Command, LiveNote, Rig};
use roomscore::scene::Scene;
use roomscore::session::{build, BuildOptions, Parts};

#[global_allocator]
static ALLOC: AllocDisabler = AllocDisabler;

#[test]
fn the_audio_callback_never_allocates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scene = Scene::load(root.join("scenes/gallery.toml")).unwrap();
    assert!(
        !scene.layers.is_empty(),
        "the test needs a kira layer in play"
    );
    let other = Scene::load(root.join("scenes/performer.toml")).unwrap();
    let (recorder_tx, mut recorder_rx) = rtrb::RingBuffer::<f32>::new(48_000 * 2);
    let Parts {
        mut engine,
        mut conductor,
        mut composer,
    } = build(
        scene,
        BuildOptions {
            sample_rate: 48_000.0,
            seed: Some(5),
            score: None,
            recorder: Some(recorder_tx),
            scenes_dir: &root.join("scenes"),
        },
    )
    .unwrap();
    // Busy music, so voices are stolen too.
    conductor
        .control
        .set_input(roomscore::scene::InputName::Movement, 1.0);
    let mut lane = engine.live_lane().unwrap();
    let mut out = vec![0f32; 256 * 2];
    let mut peak = 0f32;
    for i in 0..3000 {
        let (msg, _) = conductor.tick(256.0 / 48_000.0);
        let beat = conductor.telemetry.beat();
        composer.handle(msg, beat);
        composer.fill(beat);
        match i {
            500 => {
                for p in 60..76 {
                    conductor.send(Command::Note {
                        note: LiveNote {
                            pitch: p,
                            velocity: 0.9,
                            on: true,
                        },
                        at: None,
                    });
                }
            }
            600 => {
                for p in [48, 55, 79] {
                    lane.push(LiveNote::new(p, 90)).unwrap();
                }
            }
            1000 => {
                let (rig, _) = Rig::build(&other, 48_000.0);
                conductor.send(Command::SwapRig(Box::new(rig)));
            }
            1500 => conductor.send(Command::FadeOut(0.5)),
            1800 => conductor.send(Command::FadeIn(0.2)),
            2000 => conductor.send(Command::ReleaseAll),
            _ => {}
        }
        // Drain the recorder as its writer thread would.
        while recorder_rx.pop().is_ok() {}
        assert_no_alloc(|| engine.process(&mut out, 2));
        peak = out.iter().fold(peak, |m, s| m.max(s.abs()));
    }
    assert_eq!(
        violation_count(),
        0,
        "the audio callback allocated or freed"
    );
    assert!(peak > 0.01, "it played: peak {peak}");
    let t = &conductor.telemetry;
    // 16 s at 66 BPM with the room moving: dozens of composed notes plus 16 performer notes.
    let notes = t.notes_played.load(std::sync::atomic::Ordering::Relaxed);
    assert!(notes > 50, "{notes} notes");
}
