//! The conditioning features measured on a grid, ported from `models/train/common.py`
//! (`features`, `_ks_key`) with the windows and key profiles taken from the model card. The
//! control check measures generated music with exactly the code that measured the training data,
//! so "asked" and "heard" are in the same units.

use super::card::Card;
use crate::gen::{Step, STEPS_PER_BEAT};

/// Per-step raw features of a piece: onsets per beat, mean pitch (NaN when nothing sounds in the
/// window), mode (1 major, 0 minor, -1 unknown) and the key's tonic (pitch class, -1 unknown).
#[derive(Clone, Debug, Default)]
pub struct Features {
    pub density: Vec<f32>,
    pub register: Vec<f32>,
    pub mode: Vec<i8>,
    pub tonic: Vec<i8>,
}

/// A key as Krumhansl-Schmuckler hears it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// 1 major, 0 minor.
    pub mode: i8,
    /// Pitch class of the tonic, 0 = C.
    pub tonic: u8,
}

/// `x.sum()` as numpy adds a short float64 array (pairwise summation: eight running sums, paired
/// off, then the rest in order), so that correlations tied in exact arithmetic break the same way
/// as in Python.
fn np_sum(x: &[f64]) -> f64 {
    if x.len() < 8 {
        return x.iter().fold(0.0, |a, b| a + b);
    }
    debug_assert!(x.len() <= 128, "numpy splits longer arrays in halves first");
    let whole = x.len() - x.len() % 8;
    let mut r = [0.0; 8];
    r.copy_from_slice(&x[..8]);
    for block in x[8..whole].chunks_exact(8) {
        for (r, b) in r.iter_mut().zip(block) {
            *r += b;
        }
    }
    let paired = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    x[whole..].iter().fold(paired, |a, b| a + b)
}

/// Krumhansl-Schmuckler on a duration-weighted pitch-class histogram (`common._ks_key`): the
/// best-correlating rotation of either profile; `None` when nothing sounds or the histogram is
/// flat. Ties go to major, then to the lower tonic, as in Python, whose arithmetic this follows
/// step for step (a symmetric histogram ties rotations, and rounding then picks the tonic).
pub fn ks_key(hist: &[f64; 12], major: &[f64; 12], minor: &[f64; 12]) -> Option<Key> {
    let n = 12.0;
    let sum = np_sum(hist);
    let mean = sum / n;
    let h: [f64; 12] = std::array::from_fn(|i| hist[i] - mean);
    if sum <= 0.0 || h.iter().all(|&x| x == 0.0) {
        return None;
    }
    let dot =
        |a: &[f64; 12], b: &[f64; 12]| np_sum(&std::array::from_fn::<f64, 12, _>(|i| a[i] * b[i]));
    let hn = dot(&h, &h).sqrt();
    let best = |prof: &[f64; 12]| {
        let (mut best, mut tonic) = (-2.0f64, 0u8);
        for k in 0..12 {
            // np.roll(prof, k)[pc] = prof[(pc - k) % 12]
            let p: [f64; 12] = std::array::from_fn(|pc| prof[(pc + 12 - k) % 12]);
            let pm = np_sum(&p) / n;
            let pc: [f64; 12] = std::array::from_fn(|i| p[i] - pm);
            let r = dot(&h, &pc) / (hn * dot(&pc, &pc).sqrt());
            if r > best {
                (best, tonic) = (r, k as u8);
            }
        }
        (best, tonic)
    };
    let (maj, maj_k) = best(major);
    let (min, min_k) = best(minor);
    Some(if maj >= min {
        Key {
            mode: 1,
            tonic: maj_k,
        }
    } else {
        Key {
            mode: 0,
            tonic: min_k,
        }
    })
}

/// `common.features` on a grid of steps.
pub fn features(grid: &[Step], card: &Card) -> Features {
    let c = &card.conditioning;
    let half = (c.density.window_steps / 2) as i64;
    let mode_half = (c.mode.window_steps / 2) as i64;
    let n = grid.len();
    let mut on_c = vec![0i64; n + 1];
    let mut snd_c = vec![0i64; n + 1];
    let mut psum_c = vec![0i64; n + 1];
    let mut pc_c = vec![[0f64; 12]; n + 1];
    for t in 0..n {
        let (mut on, mut snd, mut psum) = (0, 0, 0);
        let mut pcs = pc_c[t];
        for (v, cell) in grid[t].iter().enumerate() {
            if let Some(p) = *cell {
                snd += 1;
                psum += p as i64;
                pcs[(p % 12) as usize] += 1.0;
                if t == 0 || grid[t - 1][v] != Some(p) {
                    on += 1;
                }
            }
        }
        on_c[t + 1] = on_c[t] + on;
        snd_c[t + 1] = snd_c[t] + snd;
        psum_c[t + 1] = psum_c[t] + psum;
        pc_c[t + 1] = pcs;
    }
    let mut f = Features {
        density: vec![0.0; n],
        register: vec![f32::NAN; n],
        mode: vec![-1; n],
        tonic: vec![-1; n],
    };
    let clip = |a: i64, b: i64| (a.max(0) as usize, b.min(n as i64) as usize);
    for t in 0..n as i64 {
        let (a, b) = clip(t - half, t + half);
        f.density[t as usize] =
            ((on_c[b] - on_c[a]) as f64 / ((b - a) as f64 / STEPS_PER_BEAT as f64)) as f32;
        let cnt = snd_c[b] - snd_c[a];
        if cnt > 0 {
            f.register[t as usize] = ((psum_c[b] - psum_c[a]) as f64 / cnt as f64) as f32;
        }
        let (a, b) = clip(t - mode_half, t + mode_half);
        let mut h = [0f64; 12];
        for (k, x) in h.iter_mut().enumerate() {
            *x = pc_c[b][k] - pc_c[a][k];
        }
        if let Some(k) = ks_key(&h, &c.mode.ks_major, &c.mode.ks_minor) {
            f.mode[t as usize] = k.mode;
            f.tonic[t as usize] = k.tonic as i8;
        }
    }
    f
}

/// The key of a whole grid (one histogram over every sounding cell), as the control check hears it.
pub fn grid_key(grid: &[Step], card: &Card) -> Option<Key> {
    let mut h = [0f64; 12];
    for p in grid.iter().flatten().flatten() {
        h[(p % 12) as usize] += 1.0;
    }
    let m = &card.conditioning.mode;
    ks_key(&h, &m.ks_major, &m.ks_minor)
}

/// Ranks from 0, tied values sharing the mean of their ranks (as `control_check.ranks` and scipy's
/// `rankdata`): the control sweep asks each value many times, and ranking those ties by their order
/// would correlate noise.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut first = 0;
    for tie in idx.chunk_by(|&a, &b| x[a] == x[b]) {
        let mean = first as f64 + (tie.len() - 1) as f64 / 2.0;
        for &i in tie {
            r[i] = mean;
        }
        first += tie.len();
    }
    r
}

/// Spearman's rho as `control_check.py` computes it: Pearson's correlation of the ranks.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma) * (x - ma)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb) * (y - mb)).sum();
    cov / (va * vb).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAJ: [f64; 12] = [
        6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88,
    ];
    const MIN: [f64; 12] = [
        6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17,
    ];

    fn ks_mode(hist: &[f64; 12], major: &[f64; 12], minor: &[f64; 12]) -> i8 {
        ks_key(hist, major, minor).map_or(-1, |k| k.mode)
    }

    /// `models/fixtures/features.json`: what `common.features` measured on a few grids.
    #[test]
    fn the_features_are_the_ones_python_measured_the_training_data_with() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let card = Card::load(&root.join("models/roomscore-satb-mix.json")).unwrap();
        let path = root.join("models/fixtures/features.json");
        let fx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let c = &card.conditioning;
        assert_eq!(
            (c.density.window_steps / 2, c.mode.window_steps / 2),
            (
                fx["density_half"].as_u64().unwrap() as usize,
                fx["mode_half"].as_u64().unwrap() as usize
            )
        );
        let cases = fx["cases"].as_array().unwrap();
        assert!(cases.len() >= 7);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let grid: Vec<Step> = case["grid"]
                .as_array()
                .unwrap()
                .iter()
                .map(|step| {
                    std::array::from_fn(|v| {
                        let p = step[v].as_i64().unwrap();
                        (p >= 0).then_some(p as u8)
                    })
                })
                .collect();
            let f = features(&grid, &card);
            let column = |key: &str| case[key].as_array().unwrap().clone();
            assert_eq!(f.density.len(), grid.len(), "{name}");
            // The same f64 arithmetic on both sides, rounded to f32 once: equal to the bit.
            for (t, want) in column("density").iter().enumerate() {
                let want = want.as_f64().unwrap() as f32;
                assert_eq!(f.density[t], want, "{name} step {t}: density");
            }
            for (t, want) in column("register").iter().enumerate() {
                match want.as_f64() {
                    Some(w) => assert_eq!(f.register[t], w as f32, "{name} step {t}: register"),
                    None => assert!(f.register[t].is_nan(), "{name} step {t}: register"),
                }
            }
            let ints = |key: &str| -> Vec<i8> {
                column(key)
                    .iter()
                    .map(|x| x.as_i64().unwrap() as i8)
                    .collect()
            };
            assert_eq!(f.mode, ints("mode"), "{name}: mode");
            assert_eq!(f.tonic, ints("tonic"), "{name}: tonic");
        }
        let rho = &fx["spearman"];
        let column = |key: &str| -> Vec<f64> {
            rho[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (asked, heard) = (column("asked"), column("heard"));
        let want = rho["rho"].as_f64().unwrap();
        assert!((spearman(&asked, &heard) - want).abs() < 1e-12, "{want}");
    }

    #[test]
    fn triads_are_heard_in_their_mode() {
        let mut c_major = [0.0; 12];
        for pc in [0, 4, 7, 0, 4, 7, 2, 5, 9, 11] {
            c_major[pc] += 1.0;
        }
        assert_eq!(ks_mode(&c_major, &MAJ, &MIN), 1);
        let mut a_minor = [0.0; 12];
        for pc in [9, 0, 4, 9, 0, 4, 2, 5, 11, 8] {
            a_minor[pc] += 1.0;
        }
        assert_eq!(ks_mode(&a_minor, &MAJ, &MIN), 0);
        assert_eq!(ks_mode(&[0.0; 12], &MAJ, &MIN), -1);
        assert_eq!(ks_mode(&[2.0; 12], &MAJ, &MIN), -1);
        // The key names its tonic too, wherever the triads are moved.
        for shift in 0..12 {
            let rot =
                |h: &[f64; 12]| std::array::from_fn::<f64, 12, _>(|pc| h[(pc + 12 - shift) % 12]);
            let major = ks_key(&rot(&c_major), &MAJ, &MIN).unwrap();
            assert_eq!((major.mode, major.tonic), (1, shift as u8));
            let minor = ks_key(&rot(&a_minor), &MAJ, &MIN).unwrap();
            assert_eq!((minor.mode, minor.tonic), (0, ((9 + shift) % 12) as u8));
        }
    }

    #[test]
    fn spearman_of_monotone_and_reversed() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&a, &[10.0, 20.0, 25.0, 90.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // Tied values share their mean rank, so the order they come in does not matter (ranked
        // by order, these would give 1 and 0.6).
        let asked = [1.0, 1.0, 2.0, 2.0];
        let want = 2.0 / 5f64.sqrt();
        assert!((spearman(&asked, &[1.0, 2.0, 3.0, 4.0]) - want).abs() < 1e-12);
        assert!((spearman(&asked, &[2.0, 1.0, 4.0, 3.0]) - want).abs() < 1e-12);
        assert_eq!(
            ranks(&[30.0, 10.0, 30.0, 30.0, 0.0]),
            [3.0, 1.0, 3.0, 3.0, 0.0]
        );
    }
}
