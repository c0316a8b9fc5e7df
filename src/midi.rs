//! Standard MIDI files: the notes a render played (a tempo track, then one track per voice), and
//! scores to play through a scene's instruments.

use std::path::{Path, PathBuf};

use midly::num::{u15, u24, u28, u4, u7};
use midly::{Format, Header, MetaMessage, MidiMessage, Smf, Timing, TrackEvent, TrackEventKind};

use crate::gen::NoteEvent;

/// Ticks per quarter note in the files we write.
pub const PPQ: u16 = 480;
const TRACK_NAMES: [&str; 5] = ["soprano", "alto", "tenor", "bass", "performer"];

#[derive(Debug, thiserror::Error)]
pub enum MidiError {
    #[error("{path}: cannot read MIDI file: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a standard MIDI file: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: SMPTE time code timing is not supported; save the score with metrical (PPQ) timing")]
    Timecode { path: PathBuf },
    #[error("{path}: cannot write MIDI file: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Writes note events (beats) and tempo changes (beat, BPM) as a format-1 MIDI file.
pub fn write(path: &Path, events: &[NoteEvent], tempi: &[(f64, f64)]) -> Result<(), MidiError> {
    let tick = |beat: f64| (beat.max(0.0) * PPQ as f64).round() as u64;
    let mut tempo_track = vec![(
        0u64,
        TrackEventKind::Meta(MetaMessage::TrackName(b"roomscore")),
    )];
    for &(beat, bpm) in tempi {
        let us = (60_000_000.0 / bpm.clamp(1.0, 1000.0)).round() as u32;
        tempo_track.push((
            tick(beat),
            TrackEventKind::Meta(MetaMessage::Tempo(u24::new(us))),
        ));
    }
    let mut tracks = vec![finish(tempo_track)];
    for (voice, name) in TRACK_NAMES.iter().enumerate() {
        let mut evs: Vec<(u64, bool, TrackEventKind)> = events
            .iter()
            .filter(|e| e.voice as usize == voice)
            .map(|e| {
                let channel = u4::new(voice as u8);
                let key = u7::new(e.pitch.min(127));
                let message = if e.on {
                    let vel = (e.velocity.clamp(0.0, 1.0) * 127.0).round().max(1.0) as u8;
                    MidiMessage::NoteOn {
                        key,
                        vel: u7::new(vel),
                    }
                } else {
                    MidiMessage::NoteOff {
                        key,
                        vel: u7::new(0),
                    }
                };
                (
                    tick(e.beat),
                    e.on,
                    TrackEventKind::Midi { channel, message },
                )
            })
            .collect();
        if evs.is_empty() {
            continue;
        }
        // Offs before ons at the same tick, so a repeated note is not cut by its own end.
        evs.sort_by_key(|(t, on, _)| (*t, *on));
        let mut track = vec![(
            0,
            TrackEventKind::Meta(MetaMessage::TrackName(name.as_bytes())),
        )];
        track.extend(evs.into_iter().map(|(t, _, k)| (t, k)));
        tracks.push(finish(track));
    }
    let smf = Smf {
        header: Header::new(Format::Parallel, Timing::Metrical(u15::new(PPQ))),
        tracks,
    };
    smf.save(path).map_err(|source| MidiError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn finish(mut abs: Vec<(u64, TrackEventKind<'_>)>) -> Vec<TrackEvent<'_>> {
    abs.sort_by_key(|(t, _)| *t);
    let mut last = 0;
    let mut out: Vec<TrackEvent> = abs
        .into_iter()
        .map(|(t, kind)| {
            let delta = (t - last).min(0x0FFF_FFFF) as u32;
            last = t;
            TrackEvent {
                delta: u28::new(delta),
                kind,
            }
        })
        .collect();
    out.push(TrackEvent {
        delta: u28::new(0),
        kind: TrackEventKind::Meta(MetaMessage::EndOfTrack),
    });
    out
}

/// A score read from a MIDI file: note events in beats, in time order, and its first tempo.
#[derive(Debug, Clone)]
pub struct Score {
    pub events: Vec<NoteEvent>,
    pub tempo: Option<f64>,
}

/// Reads a MIDI file. Channel `c` plays voice `c % 4` (soprano, alto, tenor, bass), so a file
/// written by `render --midi` plays back through the same instruments.
pub fn read(path: &Path) -> Result<Score, MidiError> {
    let bytes = std::fs::read(path).map_err(|source| MidiError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let smf = Smf::parse(&bytes).map_err(|e| MidiError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let ppq = match smf.header.timing {
        Timing::Metrical(t) => t.as_int().max(1) as f64,
        Timing::Timecode(..) => {
            return Err(MidiError::Timecode {
                path: path.to_path_buf(),
            })
        }
    };
    let mut events = Vec::new();
    let mut tempo: Option<(u64, f64)> = None;
    for track in &smf.tracks {
        let mut t = 0u64;
        for ev in track {
            t += ev.delta.as_int() as u64;
            match ev.kind {
                TrackEventKind::Meta(MetaMessage::Tempo(us))
                    if tempo.is_none_or(|(at, _)| t < at) =>
                {
                    tempo = Some((t, 60_000_000.0 / us.as_int().max(1) as f64));
                }
                TrackEventKind::Midi { channel, message } => {
                    let voice = channel.as_int() % 4;
                    let beat = t as f64 / ppq;
                    let (pitch, on, vel) = match message {
                        MidiMessage::NoteOn { key, vel } if vel.as_int() > 0 => {
                            (key.as_int(), true, vel.as_int() as f32 / 127.0)
                        }
                        MidiMessage::NoteOn { key, .. } | MidiMessage::NoteOff { key, .. } => {
                            (key.as_int(), false, 0.0)
                        }
                        _ => continue,
                    };
                    events.push(NoteEvent {
                        beat,
                        voice,
                        pitch,
                        velocity: vel,
                        on,
                    });
                }
                _ => {}
            }
        }
    }
    events.sort_by(|a, b| a.beat.total_cmp(&b.beat).then(a.on.cmp(&b.on)));
    Ok(Score {
        events,
        tempo: tempo.map(|t| t.1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.mid");
        let ev = |beat, voice, pitch, on| NoteEvent {
            beat,
            voice,
            pitch,
            velocity: if on { 0.5 } else { 0.0 },
            on,
        };
        let events = vec![
            ev(0.0, 0, 72, true),
            ev(1.0, 0, 72, false),
            ev(1.0, 0, 74, true),
            ev(0.5, 3, 48, true),
            ev(2.0, 3, 48, false),
            ev(2.0, 0, 74, false),
        ];
        write(&p, &events, &[(0.0, 90.0)]).unwrap();
        let score = read(&p).unwrap();
        assert_eq!(score.tempo.map(|t| t.round()), Some(90.0));
        assert_eq!(score.events.len(), 6);
        assert_eq!(score.events[0].pitch, 72);
        assert_eq!(score.events[1].beat, 0.5);
        // At beat 1 the off of 72 comes before the on of 74.
        assert!(!score.events[2].on && score.events[3].on);
        std::fs::write(&p, b"MThd garbage").unwrap();
        let err = read(&p).unwrap_err().to_string();
        assert!(err.contains("not a standard MIDI file"), "{err}");
    }
}
