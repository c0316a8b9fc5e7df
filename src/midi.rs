//! Standard MIDI files: the notes a render played (one track per voice), and scores to play.
