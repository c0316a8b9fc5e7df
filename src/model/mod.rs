//! The trained composer: an ONNX model, described by its card, run with `ort` (ONNX Runtime
//! loaded from the PyPI wheel's library, or tract where that is absent) as the scene's
//! `NoteSource`, plus the `roomscore model` commands that measure it.

pub mod card;
pub mod cli;
pub mod eval;
pub mod features;
pub mod runtime;
pub mod source;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use card::Card;
pub use runtime::{BackendKind, Cache, Net, EVICTED_KEPT};
pub use source::ModelSource;

use crate::gen::{steps_in, NoteSource};
use crate::scene::Scene;

/// The composer the engine and `roomscore model` read unless told otherwise, in `models/`. It is
/// the trained network read as a mixture over two transpositions, which scores under Music
/// Transformer's 0.335 on JSB test at a step of about 2.2 ms (three transpositions take 3.2;
/// models/README.md). The network alone, `roomscore-satb.onnx` beside it, steps faster and scores
/// above 0.335.
pub const DEFAULT_MODEL_FILE: &str = "roomscore-satb-mix.onnx";

/// The default model for a scene in `scene_dir`: the repository's `models/` sits beside `scenes/`.
pub fn default_model_beside(scene_dir: &Path) -> PathBuf {
    scene_dir.join("..").join("models").join(DEFAULT_MODEL_FILE)
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: model card field `{field}`: {message}", path = .path.display())]
    Card {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error(
        "{path}: sha256 {actual} does not match the card's {expected} ({card}); the model file \
         is corrupt or belongs to another card",
        path = .path.display(), card = .card.display()
    )]
    HashMismatch {
        path: PathBuf,
        card: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("no ONNX backend: {0}")]
    Backend(String),
    #[error("{path}: cannot load the model: {message}", path = .path.display())]
    Load { path: PathBuf, message: String },
    #[error("{path}: the graph disagrees with its card: {message}", path = .path.display())]
    Graph { path: PathBuf, message: String },
    #[error("{path}: running the model failed: {message}", path = .path.display())]
    Run { path: PathBuf, message: String },
    #[error("{path}: {message}", path = .path.display())]
    Data { path: PathBuf, message: String },
}

/// A model file and its card, opened in a session and checked against each other.
pub struct Model {
    pub card: Card,
    pub path: PathBuf,
    pub net: Net,
}

impl Model {
    /// Opens a model given as its `.onnx` file or its `.json` card.
    pub fn open(path: &Path) -> Result<Model, ModelError> {
        let card_path = card::card_path_for(path);
        if !path.exists() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file"),
            });
        }
        let card = Card::load(&card_path)?;
        let onnx = if path.extension().is_some_and(|e| e == "json") {
            card.model_path()
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&onnx).map_err(|source| ModelError::Io {
            path: onnx.clone(),
            source,
        })?;
        let actual = hex(&Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(&card.sha256) {
            return Err(ModelError::HashMismatch {
                path: onnx,
                card: card_path,
                expected: card.sha256.clone(),
                actual,
            });
        }
        let net = Net::open(&card, &onnx, &bytes)?;
        let mut model = Model {
            card,
            path: onnx,
            net,
        };
        model.check_graph()?;
        Ok(model)
    }

    /// The graph must have the card's names, and one token through it must give logits over
    /// the card's vocabulary and a cache of the card's shape; a model that fails here fails at
    /// load time, where falling back is quiet, rather than in the middle of a piece.
    fn check_graph(&mut self) -> Result<(), ModelError> {
        let (inputs, outputs) = self.net.signature();
        let names =
            |v: &[(String, String, Vec<i64>)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        let want_in: Vec<String> = self
            .card
            .onnx
            .inputs
            .iter()
            .map(|i| i.name.clone())
            .collect();
        let want_out: Vec<String> = self
            .card
            .onnx
            .outputs
            .iter()
            .map(|i| i.name.clone())
            .collect();
        let mut have_in = names(&inputs);
        let mut have_out = names(&outputs);
        let (mut wi, mut wo) = (want_in.clone(), want_out.clone());
        have_in.sort();
        have_out.sort();
        wi.sort();
        wo.sort();
        if have_in != wi || have_out != wo {
            return Err(ModelError::Graph {
                path: self.path.clone(),
                message: format!(
                    "graph inputs {have_in:?} / outputs {have_out:?}, card inputs {want_in:?} / outputs {want_out:?}"
                ),
            });
        }
        let c = &self.card;
        let mut cache = Cache::empty();
        let cond = c.conditioning.eval_vector.clone();
        let logits = self
            .net
            .forward(&[c.vocabulary.bos], &[c.voices.start_id], &cond, &mut cache)
            .map_err(|e| ModelError::Graph {
                path: self.path.clone(),
                message: format!("one BOS token does not run: {e}"),
            })?;
        if logits.iter().any(|x| !x.is_finite()) {
            return Err(ModelError::Graph {
                path: self.path.clone(),
                message: "logits of the BOS token are not finite".into(),
            });
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The model a scene names (scene validation already resolved it against the scene file), or
/// the default beside the scene.
pub fn scene_model_path(scene: &Scene) -> PathBuf {
    scene.generator.model.clone().unwrap_or_else(|| {
        default_model_beside(scene.path.parent().unwrap_or_else(|| Path::new(".")))
    })
}

/// Loads the scene's model as a note source.
pub fn load_source(scene: &Scene, seed: u64) -> Result<Box<dyn NoteSource>, ModelError> {
    let path = scene_model_path(scene);
    let model = Model::open(&path)?;
    tracing::info!(
        model = %model.path.display(),
        backend = runtime::backend()?.kind.name(),
        guidance = scene.generator.guidance,
        "composing with {}",
        model.card.name
    );
    let max_hold = steps_in(scene.generator.max_hold_beats);
    Ok(Box::new(
        ModelSource::new(
            model,
            scene.tonic,
            scene.generator.scale_lock,
            scene.generator.mode,
            seed,
        )
        .with_max_hold(max_hold)
        .with_guidance(scene.generator.guidance),
    ))
}
