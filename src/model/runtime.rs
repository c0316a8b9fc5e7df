//! Which ONNX backend runs the model, and the session wrapper over it.
//!
//! `ort` holds one global backend per process. ONNX Runtime comes from the `libonnxruntime.so`
//! of PyPI's `onnxruntime` wheel, loaded at run time, so a fresh clone needs no download outside
//! the package registries; where no such library is found the pure-Rust tract backend
//! (`ort-tract`) runs the same graph. With both `alternative-backend` and `load-dynamic`
//! enabled `ort` will not install the dylib's API by itself, so it is handed to `ort::set_api`
//! here. The choice is made once, logged in one line, and can be forced with
//! `ROOMSCORE_MODEL_BACKEND=ort|tract` (the benchmark runs itself once per backend that way).

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;

use super::card::{Card, IoNames};
use super::ModelError;

/// The lowest ONNX Runtime minor version whose API `ort` was built for (`api-24`).
const MIN_ORT_MINOR: u32 = 24;

pub const BACKEND_ENV: &str = "ROOMSCORE_MODEL_BACKEND";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    OnnxRuntime,
    Tract,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::OnnxRuntime => "ort",
            BackendKind::Tract => "tract",
        }
    }
}

/// The backend this process runs, and why.
#[derive(Clone, Debug)]
pub struct Backend {
    pub kind: BackendKind,
    /// The library and its version, for ONNX Runtime.
    pub library: Option<(PathBuf, String)>,
    pub why: String,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.kind, &self.library) {
            (BackendKind::OnnxRuntime, Some((path, version))) => write!(
                f,
                "ONNX Runtime {version} ({}; {})",
                path.display(),
                self.why
            ),
            _ => write!(f, "tract, pure Rust ({})", self.why),
        }
    }
}

struct Runtime {
    backend: Backend,
    env: ort::environment::Environment,
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The process's backend, chosen (and logged) on first use.
pub fn backend() -> Result<&'static Backend, ModelError> {
    runtime().map(|r| &r.backend)
}

fn runtime() -> Result<&'static Runtime, ModelError> {
    RUNTIME
        .get_or_init(init)
        .as_ref()
        .map_err(|e| ModelError::Backend(e.clone()))
}

fn init() -> Result<Runtime, String> {
    let forced = std::env::var(BACKEND_ENV).ok().filter(|s| !s.is_empty());
    let backend = match forced.as_deref() {
        Some("tract") => install_tract(format!("{BACKEND_ENV}=tract")),
        Some("ort") => {
            let (path, how) = find_dylib().ok_or_else(|| {
                format!(
                    "{BACKEND_ENV}=ort, but no libonnxruntime was found ({})",
                    searched()
                )
            })?;
            install_ort(&path, &how)?
        }
        Some(other) => return Err(format!("{BACKEND_ENV}={other}: expected ort or tract")),
        None => match find_dylib() {
            Some((path, how)) => match install_ort(&path, &how) {
                Ok(b) => b,
                Err(e) => {
                    // A library that fails to load before `set_api` leaves the global API free,
                    // so tract can still take over.
                    install_tract(format!("{} could not be used: {e}", path.display()))
                }
            },
            None => install_tract(format!("no libonnxruntime found ({})", searched())),
        },
    };
    tracing::info!("model backend: {backend}");
    let env = ort::init()
        .with_name("roomscore")
        .with_logger(std::sync::Arc::new(
            |level: ort::logging::LogLevel, category: &str, _id: &str, _loc: &str, msg: &str| {
                match level {
                    ort::logging::LogLevel::Error | ort::logging::LogLevel::Fatal => {
                        tracing::error!(target: "onnxruntime", "{category}: {msg}")
                    }
                    ort::logging::LogLevel::Warning => {
                        tracing::warn!(target: "onnxruntime", "{category}: {msg}")
                    }
                    _ => tracing::debug!(target: "onnxruntime", "{category}: {msg}"),
                }
            },
        ))
        .build()
        .map_err(|e| format!("{}: {e}", backend.kind.name()))?;
    Ok(Runtime { backend, env })
}

fn install_tract(why: String) -> Backend {
    ort::set_api(ort_tract::api());
    Backend {
        kind: BackendKind::Tract,
        library: None,
        why,
    }
}

fn install_ort(path: &Path, how: &str) -> Result<Backend, String> {
    // ort's own loader checks the version and keeps the library loaded for the process.
    ort::init_from(path).map_err(|e| e.to_string())?;
    // SAFETY: loading a shared library runs its initialisers; this is ONNX Runtime's own
    // library, which is what `ort` would load itself. The handle is leaked on purpose: the API
    // table handed to `ort` points into it for the rest of the process.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| e.to_string())?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    // SAFETY: `OrtGetApiBase` has this signature in every ONNX Runtime release.
    let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
        unsafe { lib.get(b"OrtGetApiBase") }
            .map_err(|_| format!("{} does not export OrtGetApiBase", path.display()))?;
    // SAFETY: the base is a static table inside the library; the version string is static too.
    let (version, api) = unsafe {
        let base = get_base();
        if base.is_null() {
            return Err("OrtGetApiBase returned null".into());
        }
        let version = std::ffi::CStr::from_ptr(((*base).GetVersionString)())
            .to_string_lossy()
            .into_owned();
        let minor: u32 = version
            .split('.')
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if minor < MIN_ORT_MINOR {
            return Err(format!(
                "version {version} is older than 1.{MIN_ORT_MINOR}, which this build needs"
            ));
        }
        let api = ((*base).GetApi)(ort::sys::ORT_API_VERSION);
        if api.is_null() {
            return Err(format!(
                "version {version} does not provide API {}",
                ort::sys::ORT_API_VERSION
            ));
        }
        (version, (*api).clone())
    };
    if !ort::set_api(api) {
        return Err("another backend was installed first".into());
    }
    Ok(Backend {
        kind: BackendKind::OnnxRuntime,
        library: Some((path.to_path_buf(), version)),
        why: how.to_string(),
    })
}

fn searched() -> String {
    format!(
        "looked at ${}, .venv/lib/python3*/site-packages/onnxruntime/capi/ under the repository, \
         and python3's onnxruntime package",
        "ORT_DYLIB_PATH"
    )
}

/// Finds `libonnxruntime.so*`: `$ORT_DYLIB_PATH`, else the repository's `.venv`, else the
/// `onnxruntime` package of whatever `python3` is on the path. Returns the path and how it was
/// found.
pub fn find_dylib() -> Option<(PathBuf, String)> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some((p, "from ORT_DYLIB_PATH".into()));
        }
        tracing::warn!(
            "ORT_DYLIB_PATH={} is not a file; looking elsewhere",
            p.display()
        );
    }
    for root in repo_roots() {
        let lib = root.join(".venv").join("lib");
        let Ok(entries) = std::fs::read_dir(&lib) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .collect();
        pythons.sort();
        for py in pythons.iter().rev() {
            let capi = py.join("site-packages").join("onnxruntime").join("capi");
            if let Some(found) = dylib_in(&capi) {
                return Some((
                    found,
                    format!("from the virtual environment in {}", root.display()),
                ));
            }
        }
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import onnxruntime,os;print(os.path.dirname(onnxruntime.__file__))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    dylib_in(&dir.join("capi")).map(|p| (p, "from python3's onnxruntime package".into()))
}

/// Where a `.venv` may sit: the working directory and its ancestors, and the source tree this
/// binary was built from (a fresh clone builds in place).
fn repo_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    roots.dedup();
    roots
}

/// The newest-looking `libonnxruntime.so*` in `dir` (the wheel ships `libonnxruntime.so.1.x.y`).
fn dylib_in(dir: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    libs.sort();
    libs.pop()
}

/// The key/value cache of one sequence, or of a batch of them decoded together (guidance's
/// conditioned and unconditional pair): per layer, sequence and head, room for `capacity`
/// positions of keys and of values, packed [layers, streams, heads, capacity, head_dim], of
/// which the first `len` are in use. The graph reads each layer's block where it lies and gives
/// back only the new tokens' keys and values, written here after the last: no pass copies the
/// whole cache, and cutting it back is a smaller `len` (what lies beyond is masked by the graph,
/// whatever it holds).
#[derive(Clone, Debug, Default)]
pub struct Cache {
    k: Vec<f32>,
    v: Vec<f32>,
    /// Sequences decoded together.
    streams: usize,
    /// Layers times streams times heads: the blocks of `capacity` positions.
    blocks: usize,
    head_dim: usize,
    capacity: usize,
    pub len: usize,
}

impl Cache {
    /// A cache with no room yet; the first pass gives it as much as that pass needs.
    pub fn empty() -> Self {
        Cache::default()
    }

    /// An empty cache for `streams` sequences with room for `positions` of `net`'s keys and
    /// values each, written once so that their pages are mapped: a step that first touches
    /// megabytes of fresh pages is the slowest step of all.
    pub fn with_capacity(net: &Net, streams: usize, positions: usize) -> Self {
        let mut c = Cache::empty();
        net.reserve(&mut c, streams, positions);
        c
    }

    /// Sequences it holds (0 before the first pass).
    pub fn streams(&self) -> usize {
        self.streams
    }

    /// Positions it has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position, keeping the room.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The keys in use, packed [layers, streams, heads, len, head_dim].
    pub fn keys(&self) -> Vec<f32> {
        self.in_use(&self.k)
    }

    /// The values in use, packed as the keys.
    pub fn values(&self) -> Vec<f32> {
        self.in_use(&self.v)
    }

    fn in_use(&self, buf: &[f32]) -> Vec<f32> {
        let (cap, d) = (self.capacity, self.head_dim);
        (0..self.blocks)
            .flat_map(|b| &buf[b * cap * d..(b * cap + self.len) * d])
            .copied()
            .collect()
    }
}

/// A slide: how many positions it drops, and the rotation that moves every kept key back by as
/// many (`cos`, `sin` of `-drop * inv_freq[i]` per pair of key dims).
#[derive(Clone, Debug)]
pub struct Turn {
    pub drop: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Turn {
    pub fn back(drop: usize, inv_freq: &[f64]) -> Self {
        let (cos, sin) = inv_freq
            .iter()
            .map(|f| {
                let a = -(drop as f64) * f;
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip();
        Turn { drop, cos, sin }
    }
}

/// `x` once per sequence of a batch of `b`: one sequence passes its slice as it is; a pair, copies
/// side by side (a few hundred bytes).
fn batched(x: &[i64], b: usize) -> Cow<'_, [i64]> {
    match b {
        1 => Cow::Borrowed(x),
        _ => Cow::Owned(x.repeat(b)),
    }
}

/// A graph input or output: name, element type, shape (-1 = dynamic).
pub type Port = (String, String, Vec<i64>);

/// One model session with the card's names and sizes.
pub struct Net {
    session: Session,
    names: IoNames,
    /// One masked position per head and sequence (up to two), the cache a pass over nothing
    /// cached reads.
    nothing: Vec<f32>,
    /// Whether a guided pair runs as one batch. tract runs a batch of two slower than two
    /// passes of one (guided step p50 20.6-22.9 ms against 18.7-20.3, models/README.md), so
    /// there each sequence gets its own pass over its own half of the cache.
    batch_pairs: bool,
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub cond_dim: usize,
    pub path: PathBuf,
}

fn ort_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Run {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl Net {
    /// Opens `bytes` (the model file at `path`, already hash-checked) on one intra-op thread.
    pub fn open(card: &Card, path: &Path, bytes: &[u8]) -> Result<Net, ModelError> {
        let rt = runtime()?;
        let load = |e: ort::Error| ModelError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut b = Session::builder(&rt.env)
            .map_err(load)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| load(e.into()))?;
        if rt.backend.kind == BackendKind::OnnxRuntime {
            // One thread: the engine runs beside the audio thread on a small machine, and the
            // step latency of this model is dominated by per-op overhead, not arithmetic.
            b = b.with_intra_threads(1).map_err(|e| load(e.into()))?;
            b = b.with_inter_threads(1).map_err(|e| load(e.into()))?;
            b = b
                .with_intra_op_spinning(false)
                .map_err(|e| load(e.into()))?;
        }
        let session = b.commit_from_memory(bytes).map_err(load)?;
        let a = &card.architecture;
        let heads = card.cache_heads();
        Ok(Net {
            session,
            names: card.io_names(),
            nothing: vec![0.0; 2 * heads * a.head_dim],
            batch_pairs: rt.backend.kind == BackendKind::OnnxRuntime,
            layers: a.layers,
            heads,
            head_dim: a.head_dim,
            vocab: card.vocabulary.size,
            cond_dim: card.conditioning.dim,
            path: path.to_path_buf(),
        })
    }

    /// The graph's input and output names with their element types and shapes (-1 = dynamic).
    pub fn signature(&self) -> (Vec<Port>, Vec<Port>) {
        let describe = |o: &ort::value::Outlet| {
            let t = o.dtype();
            (
                o.name().to_string(),
                t.tensor_type()
                    .map(|t| format!("{t:?}"))
                    .unwrap_or_default(),
                t.tensor_shape().map(|s| s.to_vec()).unwrap_or_default(),
            )
        };
        (
            self.session.inputs().iter().map(describe).collect(),
            self.session.outputs().iter().map(describe).collect(),
        )
    }

    /// Makes room in `cache` for `streams` sequences of at least `positions` each, keeping what
    /// it holds (a cache of another shape starts empty, with room for `positions` exactly).
    pub fn reserve(&self, cache: &mut Cache, streams: usize, positions: usize) {
        let (blocks, d) = (self.layers * streams * self.heads, self.head_dim);
        let same = cache.blocks == blocks && cache.head_dim == d;
        if same && cache.capacity >= positions {
            return;
        }
        // Doubling pays for a cache that grows token by token. A cache of another shape is
        // not growing: its old room says nothing of what this one needs, and every pass reads
        // the whole room (masked where unused), so a guided source built from a plain one ran
        // at twice the context, and twice the step.
        let cap = if same {
            positions.max(cache.capacity * 2)
        } else {
            positions
        };
        let keep = if same { cache.len } else { 0 };
        let grow = |old: &[f32]| {
            // Written through, not calloc'd: see `Cache::with_capacity`.
            let mut buf = Vec::with_capacity(blocks * cap * d);
            buf.resize(blocks * cap * d, 0.0);
            for b in 0..blocks.min(cache.blocks) {
                let (n, src) = (keep * d, b * cache.capacity * d);
                buf[b * cap * d..b * cap * d + n].copy_from_slice(&old[src..src + n]);
            }
            buf
        };
        *cache = Cache {
            k: grow(&cache.k),
            v: grow(&cache.v),
            streams,
            blocks,
            head_dim: d,
            capacity: cap,
            len: keep,
        };
    }

    /// Runs `tokens` (with their voices and `cond`, `cond_dim` floats per token) after what
    /// `cache` holds, returns their logits ([T * vocab]) and writes their keys and values into
    /// `cache` after the last.
    pub fn forward(
        &mut self,
        tokens: &[i64],
        voices: &[i64],
        cond: &[f32],
        cache: &mut Cache,
    ) -> Result<Vec<f32>, ModelError> {
        self.forward_streams(tokens, voices, &[cond], cache)
    }

    /// As `forward`, once for each conditioning in `conds` (one or two: guidance's pair), the
    /// same tokens at the same positions: under ONNX Runtime in one pass, so the weights are read
    /// once for both; under tract in one pass each (see `batch_pairs`).
    /// Returns the logits of each in turn ([streams * T * vocab]).
    pub fn forward_streams(
        &mut self,
        tokens: &[i64],
        voices: &[i64],
        conds: &[&[f32]],
        cache: &mut Cache,
    ) -> Result<Vec<f32>, ModelError> {
        let (t, b) = (tokens.len(), conds.len());
        debug_assert_eq!(voices.len(), t);
        debug_assert!(conds.iter().all(|c| c.len() == t * self.cond_dim));
        if b == 0 || b > 2 {
            return Err(ort_err(
                &self.path,
                format!("{b} sequences in one pass: one or two"),
            ));
        }
        if cache.len > 0 && cache.streams != b {
            return Err(ort_err(
                &self.path,
                format!(
                    "{b} sequences after a cache of {}: a cache serves one batch size",
                    cache.streams
                ),
            ));
        }
        self.reserve(cache, b, cache.len + t);
        let mut logits = Vec::with_capacity(b * t * self.vocab);
        if b > 1 && !self.batch_pairs {
            for (s, cond) in conds.iter().enumerate() {
                self.pass(tokens, voices, cond, s..s + 1, cache, &mut logits)?;
            }
        } else {
            let cond: Cow<'_, [f32]> = match conds {
                [one] => Cow::Borrowed(one),
                _ => Cow::Owned(conds.concat()),
            };
            self.pass(tokens, voices, &cond, 0..b, cache, &mut logits)?;
        }
        cache.len += t;
        Ok(logits)
    }

    /// One run of the graph over `streams` of the sequences `cache` holds (a contiguous run of
    /// them: each layer keeps its streams side by side), with `cond` for each in turn. Appends
    /// their logits to `logits` and writes their new keys and values after `cache.len`, which it
    /// leaves to the caller.
    fn pass(
        &mut self,
        tokens: &[i64],
        voices: &[i64],
        cond: &[f32],
        streams: Range<usize>,
        cache: &mut Cache,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let (t, b) = (tokens.len(), streams.len());
        let (p, cap, all) = (cache.len, cache.capacity, cache.streams);
        debug_assert!(streams.end <= all);
        debug_assert_eq!(cond.len(), b * t * self.cond_dim);
        let (heads, head_dim) = (self.heads, self.head_dim);
        let e = |e: ort::Error| ort_err(&self.path, e);
        let past_len = [p as i64];
        let (tokens, voices) = (batched(tokens, b), batched(voices, b));
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            (
                self.names.tokens.as_str().into(),
                TensorRef::from_array_view(([b, t], &*tokens))
                    .map_err(e)?
                    .into(),
            ),
            (
                self.names.voices.as_str().into(),
                TensorRef::from_array_view(([b, t], &*voices))
                    .map_err(e)?
                    .into(),
            ),
            (
                self.names.cond.as_str().into(),
                TensorRef::from_array_view(([b, t, self.cond_dim], cond))
                    .map_err(e)?
                    .into(),
            ),
            (
                self.names.past_len.as_str().into(),
                TensorRef::from_array_view(([1usize], &past_len[..]))
                    .map_err(e)?
                    .into(),
            ),
        ];
        // Each layer's blocks of these streams where they lie, no copy; with nothing cached, one
        // masked position rather than a whole capacity of them.
        let stream = heads * cap * head_dim;
        let nothing = &self.nothing[..b * heads * head_dim];
        for (names, buf) in [
            (&self.names.past_k, &cache.k),
            (&self.names.past_v, &cache.v),
        ] {
            for (i, name) in names.iter().enumerate() {
                let view = if p == 0 {
                    TensorRef::from_array_view(([b, heads, 1, head_dim], nothing))
                } else {
                    let first = (i * all + streams.start) * stream;
                    let part = &buf[first..first + b * stream];
                    TensorRef::from_array_view(([b, heads, cap, head_dim], part))
                }
                .map_err(e)?;
                inputs.push((name.as_str().into(), view.into()));
            }
        }
        let outputs = self.session.run(inputs).map_err(e)?;
        let (shape, out) = outputs[self.names.logits.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(e)?;
        if shape.to_vec() != [b as i64, t as i64, self.vocab as i64] {
            return Err(ort_err(
                &self.path,
                format!(
                    "logits have shape {shape:?}, the card says [{b}, {t}, {}]",
                    self.vocab
                ),
            ));
        }
        logits.extend_from_slice(out);
        let want = [b as i64, heads as i64, t as i64, head_dim as i64];
        for (names, buf) in [
            (&self.names.new_k, &mut cache.k),
            (&self.names.new_v, &mut cache.v),
        ] {
            for (i, name) in names.iter().enumerate() {
                let value = outputs
                    .get(name.as_str())
                    .ok_or_else(|| ort_err(&self.path, format!("the graph gave no {name}")))?;
                let (shape, data) = value.try_extract_tensor::<f32>().map_err(e)?;
                if shape.to_vec() != want {
                    return Err(ort_err(
                        &self.path,
                        format!("{name} has shape {shape:?}, expected {want:?}"),
                    ));
                }
                // [streams, heads] rows of T positions, into the layer's blocks in that order.
                let first = (i * all + streams.start) * heads;
                for (j, new) in data.chunks_exact(t * head_dim).enumerate() {
                    let dst = ((first + j) * cap + p) * head_dim;
                    buf[dst..dst + t * head_dim].copy_from_slice(new);
                }
            }
        }
        Ok(())
    }

    /// Writes into `dst` what `src` holds with its first `drop` positions dropped and every kept
    /// key moved back by `drop` positions (a rotation by `-drop * inv_freq`), so it reads as if
    /// its first kept token were at position 0 and new tokens continue at its `len`. Values carry
    /// no position and only move. `src` stays as it was (the engine keeps it for a rollback across
    /// the slide), and `dst` takes its shape, in its own buffers where they are large enough.
    pub fn slide_into(&self, src: &Cache, dst: &mut Cache, drop: usize, inv_freq: &[f64]) {
        dst.clear();
        self.slide_ahead(src, dst, &Turn::back(drop, inv_freq), usize::MAX);
    }

    /// Brings `dst`, which holds the first `dst.len` positions of `src` slid by `turn` (see
    /// `slide_into`), up to `most` positions further towards all of them. The engine builds
    /// the slid cache a few positions per token while it decodes, so the step that slides only
    /// swaps it in: done all at once, a slide moved the whole cache in one step, and those steps
    /// were the slowest (models/README.md). A `dst` of another shape starts again from nothing.
    pub fn slide_ahead(&self, src: &Cache, dst: &mut Cache, turn: &Turn, most: usize) {
        let end = src.len.saturating_sub(turn.drop);
        self.reserve(dst, src.streams, src.capacity);
        let from = dst.len.min(end);
        let to = end.min(from.saturating_add(most));
        if to == from {
            dst.len = to;
            return;
        }
        let (d, half) = (src.head_dim, src.head_dim / 2);
        let (cos, sin) = (&turn.cos[..half], &turn.sin[..half]);
        let n = (to - from) * d;
        for b in 0..src.blocks {
            let s = (b * src.capacity + turn.drop + from) * d;
            let t = (b * dst.capacity + from) * d;
            let keys = src.k[s..s + n].chunks_exact(d);
            for (old, new) in keys.zip(dst.k[t..t + n].chunks_exact_mut(d)) {
                let (x1, x2) = old.split_at(half);
                let (y1, y2) = new.split_at_mut(half);
                for i in 0..half {
                    y1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                    y2[i] = x1[i] * sin[i] + x2[i] * cos[i];
                }
            }
            dst.v[t..t + n].copy_from_slice(&src.v[s..s + n]);
        }
        dst.len = to;
    }

    /// Keeps the first `len` positions of `cache` (rollback: rotary positions are relative, so a
    /// truncated cache is exactly the cache of the shorter prefix).
    pub fn truncate(&self, cache: &mut Cache, len: usize) {
        cache.len = cache.len.min(len);
    }
}
