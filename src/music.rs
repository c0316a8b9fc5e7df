//! Pitch, key and mode: the little music theory the engine needs to stay in a scale and to hear
//! whether what it played was major or minor.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Major,
    Minor,
}

impl Mode {
    /// Scale degrees in semitones above the tonic. Minor uses the harmonic form's raised seventh
    /// on dominant chords only (see `chord_tones`), so the scale itself is natural minor.
    pub fn intervals(self) -> [u8; 7] {
        match self {
            Mode::Major => [0, 2, 4, 5, 7, 9, 11],
            Mode::Minor => [0, 2, 3, 5, 7, 8, 10],
        }
    }

    pub fn from_major_weight(w: f32) -> Self {
        if w >= 0.5 {
            Mode::Major
        } else {
            Mode::Minor
        }
    }
}

/// A 12-bit set of pitch classes, bit 0 = C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PitchSet(pub u16);

impl PitchSet {
    pub fn scale(tonic: u8, mode: Mode) -> Self {
        let mut bits = 0u16;
        for i in mode.intervals() {
            bits |= 1 << ((tonic + i) % 12);
        }
        PitchSet(bits)
    }

    pub fn contains(self, pitch: u8) -> bool {
        self.0 & (1 << (pitch % 12)) != 0
    }

    pub fn all() -> Self {
        PitchSet(0x0FFF)
    }
}

/// Parses a tonic such as "C", "F#", "Bb" into a pitch class.
pub fn parse_tonic(s: &str) -> Option<u8> {
    let mut chars = s.trim().chars();
    let base = match chars.next()?.to_ascii_uppercase() {
        'C' => 0,
        'D' => 2,
        'E' => 4,
        'F' => 5,
        'G' => 7,
        'A' => 9,
        'B' => 11,
        _ => return None,
    };
    let pc = match chars.as_str() {
        "" => base,
        "#" | "s" | "♯" => base + 1,
        "b" | "♭" => base + 11,
        _ => return None,
    };
    Some(pc % 12)
}

pub fn midi_to_hz(pitch: f32) -> f32 {
    440.0 * 2f32.powf((pitch - 69.0) / 12.0)
}

// Krumhansl-Kessler key profiles.
const MAJOR_PROFILE: [f32; 12] = [
    6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88,
];
const MINOR_PROFILE: [f32; 12] = [
    6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17,
];

fn correlation(a: &[f32; 12], b: &[f32; 12]) -> f32 {
    let ma = a.iter().sum::<f32>() / 12.0;
    let mb = b.iter().sum::<f32>() / 12.0;
    let (mut num, mut da, mut db) = (0.0, 0.0, 0.0);
    for i in 0..12 {
        num += (a[i] - ma) * (b[i] - mb);
        da += (a[i] - ma).powi(2);
        db += (b[i] - mb).powi(2);
    }
    if da <= 0.0 || db <= 0.0 {
        0.0
    } else {
        num / (da * db).sqrt()
    }
}

/// The best-matching key of a pitch-class histogram (Krumhansl-Schmuckler).
/// Returns `(tonic, mode, correlation)`, or `None` for an empty histogram.
pub fn estimate_key(histogram: &[f32; 12]) -> Option<(u8, Mode, f32)> {
    if histogram.iter().sum::<f32>() <= 0.0 {
        return None;
    }
    let mut best = (0u8, Mode::Major, f32::MIN);
    for tonic in 0..12u8 {
        for (mode, profile) in [(Mode::Major, &MAJOR_PROFILE), (Mode::Minor, &MINOR_PROFILE)] {
            let mut rotated = [0.0; 12];
            for (i, r) in rotated.iter_mut().enumerate() {
                *r = profile[(i + 12 - tonic as usize) % 12];
            }
            let c = correlation(histogram, &rotated);
            if c > best.2 {
                best = (tonic, mode, c);
            }
        }
    }
    Some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tonics_parse() {
        assert_eq!(parse_tonic("C"), Some(0));
        assert_eq!(parse_tonic("f#"), Some(6));
        assert_eq!(parse_tonic("Bb"), Some(10));
        assert_eq!(parse_tonic("H"), None);
        assert_eq!(parse_tonic("C##"), None);
    }

    #[test]
    fn scale_membership() {
        let d_major = PitchSet::scale(2, Mode::Major);
        assert!(d_major.contains(66)); // F#
        assert!(!d_major.contains(65)); // F
        let a_minor = PitchSet::scale(9, Mode::Minor);
        assert!(a_minor.contains(60));
        assert!(!a_minor.contains(61));
    }

    #[test]
    fn key_estimation_hears_major_and_minor() {
        let mut h = [0.0; 12];
        for pc in [0, 2, 4, 5, 7, 9, 11, 0, 4, 7] {
            h[pc] += 1.0;
        }
        assert_eq!(estimate_key(&h).map(|k| (k.0, k.1)), Some((0, Mode::Major)));
        let mut h = [0.0; 12];
        for pc in [9, 11, 0, 2, 4, 5, 7, 9, 0, 4, 9, 4] {
            h[pc] += 1.0;
        }
        assert_eq!(estimate_key(&h).map(|k| (k.0, k.1)), Some((9, Mode::Minor)));
        assert!(estimate_key(&[0.0; 12]).is_none());
        assert!((midi_to_hz(69.0) - 440.0).abs() < 1e-3);
    }
}
