//! Loudness measurement after ITU-R BS.1770-4 / EBU R128: the integrated loudness (LUFS) of a
//! whole programme, which is how we check that a render or a recorded night sits at the level
//! a venue or platform expects. The signal is K-weighted (a high shelf modelling the head, then
//! a high pass), cut into 400 ms blocks overlapping by 75 %, and averaged over the blocks that
//! pass two gates: an absolute one at -70 LUFS that ignores silence, and a relative one 10 LU
//! below the ungated level that ignores quiet passages. Offline and allocation-happy: not for
//! the audio thread.

/// Blocks at or below this are silence and never count.
pub const ABSOLUTE_GATE_LUFS: f64 = -70.0;
/// Blocks this far below the absolute-gated level are dropped from the final average.
pub const RELATIVE_GATE_LU: f64 = -10.0;

/// BS.1770's offset that makes a 1 kHz sine read the same in LUFS as its RMS in dBFS.
const OFFSET: f64 = -0.691;

/// Normalised biquad: `a0` is 1.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Biquad {
    b: [f64; 3],
    a: [f64; 2],
}

impl Biquad {
    /// Transposed direct form II: one pass, two state variables, good numerics in f64.
    fn run(&self, x: f64, s: &mut [f64; 2]) -> f64 {
        let y = self.b[0] * x + s[0];
        s[0] = self.b[1] * x - self.a[0] * y + s[1];
        s[1] = self.b[2] * x - self.a[1] * y;
        y
    }
}

/// The two K-weighting stages for `sample_rate`, `None` where the shelf frequency is at or
/// above Nyquist and the design breaks down.
///
/// The BS.1770 table gives coefficients for 48 kHz only. These are the analogue prototypes
/// behind that table (as recovered for libebur128) put through the bilinear transform at the
/// actual rate, which reproduces the table exactly at 48 kHz.
fn k_weighting(sample_rate: u32) -> Option<(Biquad, Biquad)> {
    let rate = f64::from(sample_rate);
    let shelf_f0 = 1681.974450955533;
    if rate <= 2.0 * shelf_f0 {
        return None;
    }
    let pi = std::f64::consts::PI;

    let gain_db = 3.999843853973347;
    let q = 0.7071752369554196;
    let k = (pi * shelf_f0 / rate).tan();
    let vh = 10f64.powf(gain_db / 20.0);
    let vb = vh.powf(0.4996667741545416);
    let a0 = 1.0 + k / q + k * k;
    let shelf = Biquad {
        b: [
            (vh + vb * k / q + k * k) / a0,
            2.0 * (k * k - vh) / a0,
            (vh - vb * k / q + k * k) / a0,
        ],
        a: [2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0],
    };

    let hp_f0 = 38.13547087602444;
    let q = 0.5003270373238773;
    let k = (pi * hp_f0 / rate).tan();
    let a0 = 1.0 + k / q + k * k;
    // The table's high pass has numerator exactly 1, -2, 1 (unnormalised), so it is kept.
    let high_pass = Biquad {
        b: [1.0, -2.0, 1.0],
        a: [2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0],
    };
    Some((shelf, high_pass))
}

/// Channel weights G_i from BS.1770, assuming ITU channel order. Surrounds count 1.41
/// (+1.5 dB); the LFE of a 5.1 stream does not count at all.
fn channel_weight(channel: usize, channels: usize) -> f64 {
    match (channels, channel) {
        (6, 3) => 0.0,
        (6, 4 | 5) | (5, 3 | 4) => 1.41,
        _ => 1.0,
    }
}

/// Integrated loudness in LUFS of interleaved `samples` with `channels` channels.
///
/// `None` when there is nothing to measure: every block gated (silence, or under -70 LUFS),
/// less than one 400 ms block of audio, no channels, or a sample rate too low for
/// K-weighting (under about 3.4 kHz). A trailing partial frame is ignored.
pub fn integrated_lufs(samples: &[f32], channels: usize, sample_rate: u32) -> Option<f64> {
    if channels == 0 {
        return None;
    }
    let (shelf, high_pass) = k_weighting(sample_rate)?;
    // Blocks are built from four 100 ms steps, which keeps the overlap at exactly 75 % even
    // at rates where 400 ms is not a whole number of samples divisible by four.
    let step = (f64::from(sample_rate) * 0.1).round() as usize;
    let frames = samples.len() / channels;
    let steps = frames / step;
    if step == 0 || steps < 4 {
        return None;
    }

    // Channel-weighted sum of squared K-weighted samples, per 100 ms step. Summing the
    // weighted channels first is fine because the gating only ever uses that sum.
    let mut step_energy = vec![0.0f64; steps];
    for ch in 0..channels {
        let weight = channel_weight(ch, channels);
        if weight == 0.0 {
            continue;
        }
        let (mut s1, mut s2) = ([0.0; 2], [0.0; 2]);
        for (i, frame) in samples
            .chunks_exact(channels)
            .take(steps * step)
            .enumerate()
        {
            let x = f64::from(frame[ch]);
            let y = high_pass.run(shelf.run(x, &mut s1), &mut s2);
            step_energy[i / step] += weight * y * y;
        }
    }

    let block_len = (4 * step) as f64;
    let blocks: Vec<f64> = step_energy
        .windows(4)
        .map(|w| w.iter().sum::<f64>() / block_len)
        .collect();

    let absolute = lufs_to_power(ABSOLUTE_GATE_LUFS);
    let gated_mean = |threshold: f64| {
        let (sum, n) = blocks
            .iter()
            .filter(|&&p| p > threshold)
            .fold((0.0, 0usize), |(s, n), &p| (s + p, n + 1));
        (n > 0).then(|| sum / n as f64)
    };
    let ungated = gated_mean(absolute)?;
    let relative = lufs_to_power(power_to_lufs(ungated) + RELATIVE_GATE_LU);
    // Blocks must pass both gates; the relative threshold is never below the absolute one
    // because it is derived from blocks that already passed it, so one comparison does.
    gated_mean(relative.max(absolute)).map(power_to_lufs)
}

fn power_to_lufs(power: f64) -> f64 {
    OFFSET + 10.0 * power.log10()
}

fn lufs_to_power(lufs: f64) -> f64 {
    10f64.powf((lufs - OFFSET) / 10.0)
}

/// Highest absolute sample value in dBFS (0 dBFS = 1.0), over all channels. Not a true peak:
/// inter-sample peaks can be up to a few dB higher. Silence or empty input gives negative
/// infinity; NaNs are ignored.
pub fn sample_peak_dbfs(samples: &[f32]) -> f64 {
    let peak = samples.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    20.0 * f64::from(peak).log10()
}

/// Mean of each channel of interleaved `samples`: a DC offset eats headroom and skews
/// loudness, so renders should show all zeros here. Empty when there are no complete frames.
pub fn dc_offset(samples: &[f32], channels: usize) -> Vec<f64> {
    if channels == 0 || samples.len() < channels {
        return Vec::new();
    }
    let mut sums = vec![0.0f64; channels];
    let mut frames = 0usize;
    for frame in samples.chunks_exact(channels) {
        for (s, &x) in sums.iter_mut().zip(frame) {
            *s += f64::from(x);
        }
        frames += 1;
    }
    sums.iter().map(|s| s / frames as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: f64 = 997.0;

    fn db(dbfs: f64) -> f64 {
        10f64.powf(dbfs / 20.0)
    }

    /// Interleaved stereo sine of `secs` at `rate`, with peak amplitudes `left`, `right`.
    fn stereo_sine(rate: u32, secs: f64, left: f64, right: f64) -> Vec<f32> {
        let n = (f64::from(rate) * secs) as usize;
        let w = 2.0 * std::f64::consts::PI * F / f64::from(rate);
        (0..n)
            .flat_map(|i| {
                let s = (w * i as f64).sin();
                [(left * s) as f32, (right * s) as f32]
            })
            .collect()
    }

    fn assert_near(got: Option<f64>, want: f64, tol: f64) {
        let got = got.expect("measured loudness");
        assert!(
            (got - want).abs() <= tol,
            "got {got:.4} LUFS, want {want} ± {tol}"
        );
    }

    #[test]
    fn coefficients_match_the_bs1770_table_at_48k() {
        let (shelf, hp) = k_weighting(48_000).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-10;
        let want_b = [1.53512485958697, -2.69169618940638, 1.19839281085285];
        let want_a = [-1.69065929318241, 0.73248077421585];
        for (g, w) in shelf.b.iter().zip(want_b).chain(shelf.a.iter().zip(want_a)) {
            assert!(close(*g, w), "shelf {g} vs {w}");
        }
        let want_a = [-1.99004745483398, 0.99007225036621];
        for (g, w) in hp.a.iter().zip(want_a) {
            assert!(close(*g, w), "high pass {g} vs {w}");
        }
        assert_eq!(hp.b, [1.0, -2.0, 1.0]);
    }

    #[test]
    fn full_scale_sine_left_only_reads_minus_3() {
        // One channel at mean square 0.5 is -3.01 dB; K-weighting's +0.69 dB at 1 kHz is what
        // the -0.691 offset cancels.
        let x = stereo_sine(48_000, 10.0, 1.0, 0.0);
        assert_near(integrated_lufs(&x, 2, 48_000), -3.01, 0.1);
    }

    #[test]
    fn full_scale_sine_both_channels_reads_0() {
        let x = stereo_sine(48_000, 10.0, 1.0, 1.0);
        assert_near(integrated_lufs(&x, 2, 48_000), 0.0, 0.1);
    }

    #[test]
    fn minus_20_dbfs_sine_reads_minus_20() {
        let x = stereo_sine(48_000, 10.0, db(-20.0), db(-20.0));
        assert_near(integrated_lufs(&x, 2, 48_000), -20.0, 0.1);
    }

    #[test]
    fn other_sample_rates_read_the_same() {
        for rate in [44_100, 96_000, 22_050] {
            let x = stereo_sine(rate, 10.0, db(-20.0), db(-20.0));
            assert_near(integrated_lufs(&x, 2, rate), -20.0, 0.1);
            let x = stereo_sine(rate, 10.0, 1.0, 0.0);
            assert_near(integrated_lufs(&x, 2, rate), -3.01, 0.1);
        }
    }

    #[test]
    fn silence_and_sub_gate_signals_give_none() {
        assert_eq!(integrated_lufs(&vec![0.0; 96_000 * 2], 2, 48_000), None);
        // -80 dBFS in both channels is -80 LUFS: under the absolute gate everywhere.
        let x = stereo_sine(48_000, 5.0, db(-80.0), db(-80.0));
        assert_eq!(integrated_lufs(&x, 2, 48_000), None);
    }

    #[test]
    fn degenerate_input_gives_none() {
        let x = stereo_sine(48_000, 1.0, 1.0, 1.0);
        assert_eq!(integrated_lufs(&x, 0, 48_000), None);
        assert_eq!(integrated_lufs(&x, 2, 0), None);
        assert_eq!(integrated_lufs(&x, 2, 3_000), None);
        // 300 ms: shorter than one block.
        assert_eq!(integrated_lufs(&x[..28_800], 2, 48_000), None);
        assert_eq!(integrated_lufs(&[], 2, 48_000), None);
    }

    #[test]
    fn trailing_partial_frame_is_ignored() {
        let mut x = stereo_sine(48_000, 2.0, db(-20.0), db(-20.0));
        let whole = integrated_lufs(&x, 2, 48_000);
        x.push(1.0);
        assert_eq!(integrated_lufs(&x, 2, 48_000), whole);
    }

    #[test]
    fn relative_gate_drops_the_quiet_half() {
        // 10 s at -20 LUFS, then 10 s at -50 LUFS (both above the absolute gate). In power
        // units (10^(L/10) after the offset) that is 1e-2 then 1e-5. 200 steps of 100 ms give
        // 197 blocks: 97 all loud, 97 all quiet, and 3 straddling with 3/4, 2/4, 1/4 loud.
        //   ungated mean = 98.5 * (1e-2 + 1e-5) / 197 = 5.005e-3  -> -23.01 LUFS
        //   relative gate = -33.01 LUFS: the quiet blocks (-50) go; the 3 straddling ones
        //   (-21.25, -23.01, -26.00) stay.
        //   gated mean = (97e-2 + 1.5015e-2) / 100 = 9.85015e-3     -> -20.07 LUFS
        // Without the relative gate it would read -23.01.
        let rate = 48_000;
        let mut x = stereo_sine(rate, 10.0, db(-20.0), db(-20.0));
        x.extend(stereo_sine(rate, 10.0, db(-50.0), db(-50.0)));
        let got = integrated_lufs(&x, 2, rate);
        assert_near(got, 10.0 * 9.85015e-3f64.log10(), 0.1);
        assert!(got.unwrap() > -20.2, "relative gate not applied: {got:?}");
    }

    #[test]
    fn absolute_gate_ignores_silence_between_passages() {
        // 5 s at -20 LUFS, 10 s of silence, 5 s at -20 LUFS. Silent blocks fail the absolute
        // gate; counted, they would put the result near -23 LUFS. What remains: 2 x 47 all-loud
        // blocks at 1e-2 and, at each edge, blocks 3/4, 2/4, 1/4 loud (7.5e-3, 5e-3, 2.5e-3;
        // all above the relative gate at about -30 LUFS).
        //   gated mean = (94e-2 + 2 * 1.5e-2) / 100 = 9.7e-3 -> -20.13 LUFS
        let rate = 48_000;
        let mut x = stereo_sine(rate, 5.0, db(-20.0), db(-20.0));
        x.extend(std::iter::repeat_n(0.0, rate as usize * 2 * 10));
        x.extend(stereo_sine(rate, 5.0, db(-20.0), db(-20.0)));
        assert_near(integrated_lufs(&x, 2, rate), 10.0 * 9.7e-3f64.log10(), 0.02);
    }

    #[test]
    fn surround_channels_are_weighted() {
        // A 5-channel stream with the sine only in Ls reads 10*log10(1.41) = 1.49 dB above the
        // same sine in L.
        let rate = 48_000;
        let mono = stereo_sine(rate, 5.0, db(-20.0), 0.0);
        let place = |ch: usize| -> Vec<f32> {
            mono.chunks_exact(2)
                .flat_map(|f| {
                    let mut out = [0.0f32; 5];
                    out[ch] = f[0];
                    out
                })
                .collect()
        };
        let front = integrated_lufs(&place(0), 5, rate).unwrap();
        let surround = integrated_lufs(&place(3), 5, rate).unwrap();
        assert!((surround - front - 10.0 * 1.41f64.log10()).abs() < 0.01);
        // 5.1: the LFE (channel 3 of 6) does not count.
        let lfe_only: Vec<f32> = mono
            .chunks_exact(2)
            .flat_map(|f| [0.0, 0.0, 0.0, f[0], 0.0, 0.0])
            .collect();
        assert_eq!(integrated_lufs(&lfe_only, 6, rate), None);
    }

    #[test]
    fn sample_peak() {
        assert_eq!(sample_peak_dbfs(&[0.0, 0.5, -1.0, 0.25]), 0.0);
        assert!((sample_peak_dbfs(&[0.1, -0.05]) - -20.0).abs() < 1e-6);
        assert_eq!(sample_peak_dbfs(&[]), f64::NEG_INFINITY);
        assert_eq!(sample_peak_dbfs(&[0.0; 4]), f64::NEG_INFINITY);
        assert_eq!(sample_peak_dbfs(&[f32::NAN, 0.5]), 20.0 * 0.5f64.log10());
    }

    #[test]
    fn dc_offset_per_channel() {
        let x = [0.5, -1.0, 0.3, -1.0, 0.1, 1.0, 0.7];
        let dc = dc_offset(&x, 2);
        assert_eq!(dc.len(), 2);
        assert!(
            (dc[0] - 0.3).abs() < 1e-6 && (dc[1] - -1.0 / 3.0).abs() < 1e-6,
            "{dc:?}"
        );
        assert!(dc_offset(&x, 0).is_empty());
        assert!(dc_offset(&[0.1], 2).is_empty());
        let sine = stereo_sine(48_000, 1.0, 1.0, 1.0);
        assert!(dc_offset(&sine, 2).iter().all(|d| d.abs() < 1e-3));
    }
}
