//! The conditioning features measured on a grid, ported from `models/train/common.py`
//! (`features`, `_ks_key`) with the windows and key profiles taken from the model card. The
//! control check measures generated music with exactly the code that measured the training data,
//! so "asked" and "heard" are in the same units.

use super::card::Card;
use crate::gen::{Step, STEPS_PER_BEAT};

/// Per-step raw features of a piece: onsets per beat, mean pitch (NaN when nothing sounds in the
/// window) and mode (1 major, 0 minor, -1 unknown).
#[derive(Clone, Debug, Default)]
pub struct Features {
    pub density: Vec<f32>,
    pub register: Vec<f32>,
    pub mode: Vec<i8>,
}

/// A key as Krumhansl-Schmuckler hears it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// 1 major, 0 minor.
    pub mode: i8,
    /// Pitch class of the tonic, 0 = C.
    pub tonic: u8,
}

/// Krumhansl-Schmuckler on a duration-weighted pitch-class histogram (`common._ks_key`): the
/// best-correlating rotation of either profile; `None` when nothing sounds or the histogram is
/// flat. Ties go to major, then to the lower tonic, as in Python.
pub fn ks_key(hist: &[f64; 12], major: &[f64; 12], minor: &[f64; 12]) -> Option<Key> {
    let n = 12.0;
    let sum: f64 = hist.iter().sum();
    let mean = sum / n;
    let var = hist.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    if sum <= 0.0 || var == 0.0 {
        return None;
    }
    let h: Vec<f64> = hist.iter().map(|x| x - mean).collect();
    let hn = h.iter().map(|x| x * x).sum::<f64>().sqrt();
    let best = |prof: &[f64; 12]| {
        let (mut best, mut tonic) = (-2.0f64, 0u8);
        for k in 0..12 {
            // np.roll(prof, k)[pc] = prof[(pc - k) % 12]
            let p: Vec<f64> = (0..12).map(|pc| prof[(pc + 12 - k) % 12]).collect();
            let pm = p.iter().sum::<f64>() / n;
            let pc: Vec<f64> = p.iter().map(|x| x - pm).collect();
            let pn = pc.iter().map(|x| x * x).sum::<f64>().sqrt();
            let r = h.iter().zip(&pc).map(|(a, b)| a * b).sum::<f64>() / (hn * pn);
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

/// The mode alone: 1 major, 0 minor, -1 unknown.
pub fn ks_mode(hist: &[f64; 12], major: &[f64; 12], minor: &[f64; 12]) -> i8 {
    ks_key(hist, major, minor).map_or(-1, |k| k.mode)
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
        f.mode[t as usize] = ks_mode(&h, &c.mode.ks_major, &c.mode.ks_minor);
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

/// Ranks with ties broken by order, as `np.argsort(np.argsort(x))` gives them.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]).then(a.cmp(&b)));
    let mut r = vec![0.0; x.len()];
    for (rank, &i) in idx.iter().enumerate() {
        r[i] = rank as f64;
    }
    r
}

/// Spearman's rho the way `control_check.py` computes it (Pearson on the ranks).
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
    }
}
