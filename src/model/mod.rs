//! The trained composer: an ONNX model run with `ort`, as a `NoteSource`.

use crate::gen::NoteSource;
use crate::scene::Scene;

/// Loads the scene's model as a note source.
pub fn load_source(scene: &Scene, _seed: u64) -> Result<Box<dyn NoteSource>, String> {
    let path = scene
        .generator
        .model
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    Err(format!(
        "{path}: this build has no ONNX runtime support yet"
    ))
}
