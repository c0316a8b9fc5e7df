//! The instruments' timbres as fundsp graphs. A voice graph takes one input, its envelope
//! (so a timbre can brighten with it), and gives a mono signal; the envelope's gain itself is
//! applied by the voice pool, sample-accurately.

use fundsp::prelude32::*;

use crate::scene::{InstrumentKind, Master};

/// Builds one voice's graph. `freq` is the voice's own; `cutoff` is shared by the instrument's
/// voices and smoothed inside the graph, so the control thread can move it freely.
pub fn voice_unit(
    kind: InstrumentKind,
    freq: &Shared,
    cutoff: &Shared,
    sample_rate: f32,
) -> Box<dyn AudioUnit> {
    let smooth_cutoff = || var(cutoff) >> follow(0.08);
    let mut unit: Box<dyn AudioUnit> = match kind {
        InstrumentKind::Pad => {
            // Two saws beating slowly, and a sine an octave down for body.
            let osc = var(freq)
                >> ((saw() * 0.3) & (mul(1.0035) >> (saw() * 0.3)) & (mul(0.5) >> (sine() * 0.35)));
            Box::new(sink() | ((osc | smooth_cutoff() | dc(0.6)) >> lowpass()))
        }
        InstrumentKind::Pluck => {
            // Bright at the attack, darkening as the envelope falls.
            let osc =
                var(freq) >> ((saw() * 0.45) & (mul(2.0) >> (square() * 0.1)) & (triangle() * 0.3));
            let cut = ((pass() * 1.4 + 0.12) * smooth_cutoff()) >> clip_to(40.0, 18_000.0);
            Box::new((osc | cut | dc(0.9)) >> lowpass())
        }
        InstrumentKind::Bell => {
            // Two-operator FM at an inharmonic ratio; the index follows the envelope.
            let modulator = (var(freq) >> mul(3.5) >> sine()) * ((pass() * 1.6) * var(freq));
            let carrier = (var(freq) + modulator) >> (sine() * 0.6);
            Box::new((carrier | smooth_cutoff() | dc(0.5)) >> lowpass())
        }
        InstrumentKind::Bass => {
            let osc = var(freq) >> ((sine() * 0.7) & (soft_saw() * 0.35));
            Box::new(sink() | ((osc | smooth_cutoff() | dc(0.7)) >> lowpass()))
        }
    };
    unit.set_sample_rate(sample_rate as f64);
    unit.allocate();
    unit
}

/// The master section: reverb send, DC block, volume, then a limiter with a ceiling and a clip
/// at the ceiling. Two inputs, two outputs.
///
/// The limiter looks ahead `master.limiter_lookahead` (default a quarter of a millisecond, which
/// catches the attacks of these instruments, none faster than 3 ms); every sample of lookahead
/// is latency a performer's note pays. At zero the limiter still delays one sample and reacts
/// within it, and the clip catches what gets through.
pub fn master_unit(
    master: &Master,
    reverb: &Shared,
    volume: &Shared,
    sample_rate: f32,
) -> Box<dyn AudioUnit> {
    let ceiling = 10f32.powf(master.ceiling_db / 20.0);
    let wet = reverb_stereo(master.room, master.reverb_time, 0.5)
        * (var(reverb) >> follow(0.2) >> split::<U2>());
    let with_reverb = multipass::<U2>() & wet;
    let gain = var(volume) >> follow(0.05) >> split::<U2>();
    let chain = with_reverb
        >> (dcblock() | dcblock())
        >> (multipass::<U2>() * gain)
        >> (mul(1.0 / ceiling) | mul(1.0 / ceiling))
        >> limiter_stereo(master.limiter_lookahead, 0.25)
        >> (clip_to(-1.0, 1.0) | clip_to(-1.0, 1.0))
        >> (mul(ceiling) | mul(ceiling));
    let mut unit: Box<dyn AudioUnit> = Box::new(chain);
    unit.set_sample_rate(sample_rate as f64);
    unit.allocate();
    unit
}
