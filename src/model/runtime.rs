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
/// conditioned and unconditional pair): per layer, sequence and head, `capacity` slots of keys
/// and of values, packed [layers, streams, heads, capacity, head_dim], of which the first `len`
/// are in use. The graph reads each layer's block where it lies and gives back only the new
/// tokens' keys and values, written here into the next slot: no pass copies the whole cache.
///
/// A cache made by `Cache::ring` keeps its room: once every slot is in use, each new token
/// overwrites the oldest one's slot, so every token hears the `capacity` before it and the
/// buffer never moves (the graph attends to the slots in use whatever their order, and rotary
/// scores depend on differences of positions only). What an overwrite replaced is kept for a
/// while, so taking tokens back puts it back. Any other cache grows to what a pass needs.
#[derive(Clone, Debug, Default)]
pub struct Cache {
    k: Vec<f32>,
    v: Vec<f32>,
    /// Sequences decoded together.
    streams: usize,
    /// Layers times streams times heads: the blocks of `capacity` slots.
    blocks: usize,
    head_dim: usize,
    capacity: usize,
    /// Whether the room is fixed: a full cache overwrites its oldest slot instead of growing.
    ring: bool,
    /// Tokens in the cache since it was last emptied; past a ring's `capacity`, each overwrote
    /// a slot (the slots in use are `len`).
    added: usize,
    /// The rotary position of the next token. It is `added` until the positions reach the end
    /// of the graph's rotation tables, and then every key is turned back (`Net::turn_back`).
    pos: usize,
    /// How many times the keys were turned back.
    turned: usize,
    evicted: Evicted,
}

/// What the latest overwrites of a ring replaced, newest last: per token, each block's key and
/// value ([blocks][2][head_dim]). Its room is taken when the ring is made, so that decoding
/// allocates nothing.
#[derive(Clone, Debug, Default)]
struct Evicted {
    data: Vec<f32>,
    /// Floats per token.
    each: usize,
    /// Tokens it has room for.
    room: usize,
    /// Where the oldest kept token starts (in tokens), and how many are kept.
    first: usize,
    count: usize,
}

impl Evicted {
    fn new(each: usize, room: usize) -> Self {
        Evicted {
            data: written_zeros(each * room),
            each,
            room,
            first: 0,
            count: 0,
        }
    }

    /// Room for the next token, dropping the oldest when full.
    fn push(&mut self) -> &mut [f32] {
        if self.room == 0 {
            return &mut [];
        }
        if self.count == self.room {
            self.first = (self.first + 1) % self.room;
            self.count -= 1;
        }
        let at = (self.first + self.count) % self.room;
        self.count += 1;
        &mut self.data[at * self.each..(at + 1) * self.each]
    }

    fn pop(&mut self) -> Option<&[f32]> {
        if self.count == 0 {
            return None;
        }
        self.count -= 1;
        let at = (self.first + self.count) % self.room;
        Some(&self.data[at * self.each..(at + 1) * self.each])
    }

    fn for_each_kept(&mut self, mut f: impl FnMut(&mut [f32])) {
        for i in 0..self.count {
            let at = (self.first + i) % self.room;
            f(&mut self.data[at * self.each..(at + 1) * self.each]);
        }
    }
}

/// `n` zeros written one by one, not calloc'd, so that their pages are mapped now rather than
/// on the step that first touches them (see `Cache::with_capacity`).
fn written_zeros(n: usize) -> Vec<f32> {
    let mut buf = Vec::with_capacity(n);
    buf.resize(n, 0.0);
    buf
}

/// Tokens of overwritten slots a ring keeps for taking back: 64 steps of four. A rollback
/// reaches a few steps back; one further than this rebuilds the cache (`ModelSource::rollback`).
pub const EVICTED_KEPT: usize = 256;

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

    /// An empty ring of `slots` for `streams` sequences (see `Cache`), keeping what the last
    /// `EVICTED_KEPT` overwrites replaced.
    pub fn ring(net: &Net, streams: usize, slots: usize) -> Self {
        assert!(slots > 0, "a ring needs a slot");
        let mut c = Cache::with_capacity(net, streams, slots);
        c.ring = true;
        c.evicted = Evicted::new(c.blocks * 2 * c.head_dim, EVICTED_KEPT);
        c
    }

    /// Sequences it holds (0 before the first pass).
    pub fn streams(&self) -> usize {
        self.streams
    }

    /// Whether it was made by `Cache::ring`.
    pub fn is_ring(&self) -> bool {
        self.ring
    }

    /// Slots it has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens it took in since it was last emptied (beyond `capacity`, a ring's overwrites).
    pub fn added(&self) -> usize {
        self.added
    }

    /// The rotary position the next token takes.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// How many times its keys were turned back to lower the positions.
    pub fn turned(&self) -> usize {
        self.turned
    }

    /// Slots in use: the first `len` (all of them once a ring is full).
    pub fn len(&self) -> usize {
        match self.ring {
            true => self.added.min(self.capacity),
            false => self.added,
        }
    }

    /// Whether it holds no token.
    pub fn is_empty(&self) -> bool {
        self.added == 0
    }

    /// Whether every slot is in use in a ring, so that the next token overwrites one.
    fn full_ring(&self) -> bool {
        self.ring && self.capacity > 0 && self.added >= self.capacity
    }

    /// The slot the next token goes to.
    fn next_slot(&self) -> usize {
        match self.full_ring() {
            true => self.added % self.capacity,
            false => self.added,
        }
    }

    /// Forgets every token, keeping the room.
    pub fn clear(&mut self) {
        self.added = 0;
        self.pos = 0;
        self.evicted.first = 0;
        self.evicted.count = 0;
    }

    /// Whether the last `n` tokens can be taken back: a ring keeps only the latest overwrites.
    fn can_take_back(&self, n: usize) -> bool {
        let n = n.min(self.added);
        let over = |added: usize| added.saturating_sub(self.capacity);
        !self.ring || over(self.added) - over(self.added - n) <= self.evicted.count
    }

    /// Takes back the last `n` tokens (`can_take_back`, and `n` at most `pos`: see
    /// `Net::truncate`): the slots they filled are free again, or hold once more what they
    /// overwrote.
    fn take_back(&mut self, n: usize) {
        let n = n.min(self.added);
        debug_assert!(self.can_take_back(n) && n <= self.pos);
        for _ in 0..n {
            self.added -= 1;
            self.pos -= 1;
            // A token that overwrote a slot gives back what was there; one that filled a free
            // slot frees it (`len` counts down with `added`).
            if self.ring && self.added >= self.capacity {
                let restored = self.take_back_evicted(self.added % self.capacity);
                debug_assert!(restored, "counted above");
            }
        }
    }

    /// Puts back into `slot` what the latest overwrite replaced (a pass over it failed).
    fn take_back_evicted(&mut self, slot: usize) -> bool {
        let (d, cap) = (self.head_dim, self.capacity);
        let Some(old) = self.evicted.pop() else {
            return false;
        };
        for (b, kv) in old.chunks_exact(2 * d).enumerate() {
            let at = (b * cap + slot) * d;
            self.k[at..at + d].copy_from_slice(&kv[..d]);
            self.v[at..at + d].copy_from_slice(&kv[d..]);
        }
        true
    }

    /// Keeps what `slot` holds (every block's key and value) before a token overwrites it.
    fn keep_evicted(&mut self, slot: usize) {
        let (d, cap) = (self.head_dim, self.capacity);
        let row = self.evicted.push();
        for (b, kv) in row.chunks_exact_mut(2 * d).enumerate() {
            let at = (b * cap + slot) * d;
            kv[..d].copy_from_slice(&self.k[at..at + d]);
            kv[d..].copy_from_slice(&self.v[at..at + d]);
        }
    }

    /// The keys of the slots in use, packed [layers, streams, heads, len, head_dim] in slot order.
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
            .flat_map(|b| &buf[b * cap * d..(b * cap + self.len()) * d])
            .copied()
            .collect()
    }
}

/// A turn of every key back by `by` positions: `cos`, `sin` of `-by * inv_freq[i]` per pair of
/// key dims (rotary pairs dims i and i + head_dim/2).
#[derive(Clone, Debug)]
struct Turn {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Turn {
    fn back(by: i64, inv_freq: &[f64]) -> Self {
        let (cos, sin) = inv_freq
            .iter()
            .map(|f| {
                let a = -(by as f64) * f;
                (a.cos() as f32, a.sin() as f32)
            })
            .unzip();
        Turn { cos, sin }
    }

    /// Turns one key (`head_dim` floats) in place.
    fn apply(&self, key: &mut [f32]) {
        let half = key.len() / 2;
        let (x1, x2) = key.split_at_mut(half);
        for i in 0..half {
            let (a, b) = (x1[i], x2[i]);
            x1[i] = a * self.cos[i] - b * self.sin[i];
            x2[i] = a * self.sin[i] + b * self.cos[i];
        }
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
    /// The rotary frequencies, to turn cached keys back when the positions reach the end of
    /// the graph's rotation tables (`max_positions`).
    inv_freq: Vec<f64>,
    max_positions: usize,
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
            inv_freq: card
                .rotary
                .as_ref()
                .map(|r| r.inv_freq(a.head_dim))
                .unwrap_or_default(),
            max_positions: card.max_positions,
            layers: a.layers,
            heads,
            head_dim: a.head_dim,
            vocab: card.vocabulary.size,
            cond_dim: card.conditioning.dim,
            path: path.to_path_buf(),
        })
    }

    /// Lowers the positions the graph's rotation tables are taken to reach (never above the
    /// card's `max_positions`), so that the turn a months-long run makes every few hundred
    /// steps can be made within a short test.
    pub fn limit_positions(&mut self, n: usize) {
        self.max_positions = n.min(self.max_positions);
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
        // A ring's room is fixed: passes into a full one take a token each (`forward_streams`).
        if same && (cache.capacity >= positions || cache.ring) {
            return;
        }
        // Doubling pays for a cache that grows token by token. A cache of another shape is
        // not growing: its old room says nothing of what this one needs, and every pass reads
        // the whole room (masked where unused), so a guided source built from a plain one ran
        // at twice the context, and twice the step.
        let cap = if same {
            positions.max(cache.capacity * 2)
        } else if cache.ring && cache.capacity > 0 {
            // A ring of another shape keeps its slots: its room is the context it hears.
            cache.capacity
        } else {
            positions
        };
        let keep = if same { cache.len() } else { 0 };
        let grow = |old: &[f32]| {
            let mut buf = written_zeros(blocks * cap * d);
            for b in 0..blocks.min(cache.blocks) {
                let (n, src) = (keep * d, b * cache.capacity * d);
                buf[b * cap * d..b * cap * d + n].copy_from_slice(&old[src..src + n]);
            }
            buf
        };
        let evicted = match cache.ring {
            true => Evicted::new(blocks * 2 * d, EVICTED_KEPT),
            false => Evicted::default(),
        };
        *cache = Cache {
            k: grow(&cache.k),
            v: grow(&cache.v),
            streams,
            blocks,
            head_dim: d,
            capacity: cap,
            ring: cache.ring,
            added: keep,
            pos: if same { cache.pos } else { 0 },
            turned: cache.turned,
            evicted,
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
        if !cache.is_empty() && cache.streams != b {
            return Err(ort_err(
                &self.path,
                format!(
                    "{b} sequences after a cache of {}: a cache serves one batch size",
                    cache.streams
                ),
            ));
        }
        if !cache.ring {
            return self.chunk(tokens, voices, conds, cache);
        }
        // A ring takes what fits before it is full in one pass, then a token a pass, each over
        // the oldest slot: a longer pass into a full ring would let its later tokens hear more
        // than the context. Logits come back per sequence, so chunks are put back in order.
        let mut per_stream: Vec<Vec<f32>> = Vec::new();
        let before = cache.added;
        let mut i = 0;
        while i < t {
            let n = match cache.full_ring() {
                true => 1,
                false => (t - i).min(cache.capacity - cache.len()),
            };
            let (cd, span) = (self.cond_dim, i..i + n);
            let parts: Vec<&[f32]>;
            let part_conds = match n == t {
                true => conds,
                false => {
                    parts = conds.iter().map(|c| &c[i * cd..(i + n) * cd]).collect();
                    &parts
                }
            };
            let out = match self.chunk(&tokens[span.clone()], &voices[span], part_conds, cache) {
                Ok(out) => out,
                Err(e) => {
                    // The chunks before it took tokens in: take them back, so that a failed
                    // pass leaves the cache as it was (to float rounding, where the keys were
                    // turned meanwhile); the caller keeps its tokens so too.
                    let restored = self.truncate(cache, before);
                    debug_assert!(restored, "a pass's own overwrites are kept");
                    return Err(e);
                }
            };
            if n == t {
                // One chunk (every decoding step): its logits are already in order.
                return Ok(out);
            }
            if per_stream.is_empty() {
                per_stream = vec![Vec::with_capacity(t * self.vocab); b];
            }
            for (s, part) in out.chunks_exact(n * self.vocab).enumerate() {
                per_stream[s].extend_from_slice(part);
            }
            i += n;
        }
        Ok(per_stream.concat())
    }

    /// One pass of `tokens` for every sequence (see `forward_streams`), into slots that follow
    /// what `cache` holds, or over its oldest slot when it is a full ring.
    fn chunk(
        &mut self,
        tokens: &[i64],
        voices: &[i64],
        conds: &[&[f32]],
        cache: &mut Cache,
    ) -> Result<Vec<f32>, ModelError> {
        let (t, b) = (tokens.len(), conds.len());
        self.reserve(cache, b, cache.len() + t);
        if cache.pos + t > self.max_positions {
            self.turn_back(cache)?;
        }
        let slot = cache.next_slot();
        let full = cache.full_ring();
        if full {
            cache.keep_evicted(slot);
        }
        let mut logits = Vec::with_capacity(b * t * self.vocab);
        let run = |net: &mut Self, cache: &mut Cache, logits: &mut Vec<f32>| {
            if b > 1 && !net.batch_pairs {
                for (s, cond) in conds.iter().enumerate() {
                    net.pass(tokens, voices, cond, s..s + 1, cache, logits)?;
                }
                Ok(())
            } else {
                let cond: Cow<'_, [f32]> = match conds {
                    [one] => Cow::Borrowed(one),
                    _ => Cow::Owned(conds.concat()),
                };
                net.pass(tokens, voices, &cond, 0..b, cache, logits)
            }
        };
        if let Err(e) = run(self, cache, &mut logits) {
            if full {
                // The slot may be half written: put back what it held.
                let kept = cache.take_back_evicted(slot);
                debug_assert!(kept);
            }
            return Err(e);
        }
        cache.added += t;
        cache.pos += t;
        Ok(logits)
    }

    /// Turns every cached key back so that the oldest in use reads as position 0, and the next
    /// token's position drops by as many: the graph looks rotations up in tables of
    /// `max_positions` rows. Rotary scores depend on differences of positions only, so what
    /// the cache holds reads the same (within float rounding, models/train/ring.py measures
    /// it); the kept overwrites turn with it.
    fn turn_back(&self, cache: &mut Cache) -> Result<(), ModelError> {
        let by = cache.pos.saturating_sub(cache.len());
        if by == 0 || self.inv_freq.is_empty() {
            return Err(ort_err(
                &self.path,
                format!(
                    "{} positions cached: the graph's rotations reach {} (max_positions)",
                    cache.len(),
                    self.max_positions
                ),
            ));
        }
        self.turn(cache, by as i64);
        Ok(())
    }

    /// Turns every key the cache holds or keeps back by `by` positions (forward where
    /// negative), and the next token's position with them.
    fn turn(&self, cache: &mut Cache, by: i64) {
        let turn = Turn::back(by, &self.inv_freq);
        let (cap, d, len) = (cache.capacity, cache.head_dim, cache.len());
        for b in 0..cache.blocks {
            for key in cache.k[b * cap * d..(b * cap + len) * d].chunks_exact_mut(d) {
                turn.apply(key);
            }
        }
        cache.evicted.for_each_kept(|row| {
            for kv in row.chunks_exact_mut(2 * d) {
                turn.apply(&mut kv[..d]);
            }
        });
        cache.pos = usize::try_from(cache.pos as i64 - by).expect("turned to a position >= 0");
        cache.turned += 1;
    }

    /// One run of the graph over `streams` of the sequences `cache` holds (a contiguous run of
    /// them: each layer keeps its streams side by side), with `cond` for each in turn. Appends
    /// their logits to `logits` and writes their new keys and values into the next slots (see
    /// `Cache::next_slot`), leaving the cache's counts to the caller.
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
        let (p, cap, all) = (cache.len(), cache.capacity, cache.streams);
        // The caller moves the cache on once every sequence has had its pass.
        let slot = cache.next_slot();
        debug_assert!(slot + t <= cap);
        debug_assert!(streams.end <= all);
        debug_assert_eq!(cond.len(), b * t * self.cond_dim);
        let (heads, head_dim) = (self.heads, self.head_dim);
        let e = |e: ort::Error| ort_err(&self.path, e);
        let (past_len, pos) = ([p as i64], [cache.pos as i64]);
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
            (
                self.names.pos.as_str().into(),
                TensorRef::from_array_view(([1usize], &pos[..]))
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
                    let dst = ((first + j) * cap + slot) * head_dim;
                    buf[dst..dst + t * head_dim].copy_from_slice(new);
                }
            }
        }
        Ok(())
    }

    /// Keeps the first `len` tokens of `cache` (rollback: rotary positions are relative, so the
    /// cache of a shorter prefix is the cache cut back, with a ring's overwrites put back).
    /// False, with the cache as it was, where an overwrite it needs is no longer kept.
    #[must_use]
    pub fn truncate(&self, cache: &mut Cache, len: usize) -> bool {
        let n = cache.added.saturating_sub(len);
        if !cache.can_take_back(n) {
            return false;
        }
        if n > cache.pos {
            // Back across a turn, the positions would drop below 0, where the graph has no
            // rotation: everything it holds turns forward first.
            if self.inv_freq.is_empty() {
                return false;
            }
            self.turn(cache, -((n - cache.pos) as i64));
        }
        cache.take_back(n);
        true
    }
}
