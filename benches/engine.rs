//! Criterion benchmarks: offline render of each shipped scene, and the audio callback at 256
//! frames with 32 sounding voices. `roomscore bench` reports the same figures as multiples of
//! real time and shares of the buffer period.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use roomscore::render::{render, RenderOptions};

fn renders(c: &mut Criterion) {
    let mut group = c.benchmark_group("render 5 s");
    group.sample_size(10);
    for scene in ["gallery", "performer", "night"] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("scenes/{scene}.toml"));
        group.bench_function(scene, |b| {
            b.iter(|| {
                render(&RenderOptions {
                    scene: path.clone(),
                    seconds: 5.0,
                    inputs: None,
                    seed: Some(1),
                    sample_rate: 48_000,
                    score: None,
                })
                .expect("render")
            })
        });
    }
    group.finish();
}

fn callback(c: &mut Criterion) {
    c.bench_function("callback 256 frames x 500, 32 voices", |b| {
        b.iter(|| roomscore::bench::callback_cost(256, 500, 48_000.0).expect("bench scene"))
    });
}

criterion_group!(benches, renders, callback);
criterion_main!(benches);
