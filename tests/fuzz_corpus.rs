//! Every input the fuzzer kept (`fuzz/corpus/osc_dispatch`, minimised, and the seeds in
//! `fuzz/seeds`) goes through the receiver's decode-and-dispatch path again on stable Rust, so a
//! crash the fuzzer once found stays fixed without nightly. `cargo +nightly fuzz run
//! osc_dispatch` explores further (see fuzz/README.md).

use std::path::Path;

#[test]
fn the_fuzz_corpus_decodes_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = 0;
    let mut events = 0;
    for dir in ["seeds", "corpus/osc_dispatch"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let (ok, _refused) =
                std::panic::catch_unwind(|| roomscore::input::fuzzing::receive(&bytes))
                    .unwrap_or_else(|_| panic!("{} panics the OSC path", path.display()));
            events += ok;
            files += 1;
        }
    }
    assert!(files >= 14, "only {files} corpus files");
    // The seeds are good messages: the path must still accept them, not just survive.
    assert!(events >= 10, "only {events} events from the corpus");
}
