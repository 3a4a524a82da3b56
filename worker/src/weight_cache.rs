//! Weights from one machine: an op's weights as a [`Blob`] (the bytes the leader streams),
//! the rank's cache of them, and the checkpoint's content hash that names that cache.
//!
//! A rank's cache lives at `<cache>/weights/<checkpoint hash>/<variant>/<op>.bin` (the
//! variant names what the bytes are: the run's dtype and how quantized weights are held).
//! Files are written to a temporary name and renamed, so a reader sees a whole file or
//! none, and every file is checked against its SHA-256 when read: a corrupt one is a miss
//! and is fetched again. The leader hashes each checkpoint file once and remembers the
//! hash by path, length and modification time (`<cache>/checkpoints/`), as git's index
//! does, so a restart does not reread 14 GB.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Embedding, Linear};
use lemur_protocol::blob::{encode_blob, hex, read_blob, BlobMeta, CheckpointRef, Encoding, OpRef};
use lemur_protocol::{ModelConfig, OpKind, WeightFormat};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::WorkerError;
use crate::exec::OpWeights;
use crate::tensor_wire::{candle_dtype, wire_dtype};
use crate::weights::{format_of, ggml_type, weight_shape};

/// One op's weights as bytes: what the leader streams and the cache stores.
#[derive(Debug, Clone, PartialEq)]
pub struct Blob {
    pub meta: BlobMeta,
    pub data: Vec<u8>,
}

impl Blob {
    fn new(op: OpRef, shape: &[usize], encoding: Encoding, data: Vec<u8>) -> Self {
        let meta = BlobMeta {
            op,
            shape: shape.to_vec(),
            encoding,
            len: data.len() as u64,
            sha256: lemur_protocol::blob::sha256_hex(&data),
        };
        Self { meta, data }
    }

    /// Op `op`'s weights as a blob, `None` for an op without weights.
    pub fn of(op: OpRef, w: &OpWeights) -> Result<Option<Self>, WorkerError> {
        let dense = |t: &Tensor| -> Result<Self, WorkerError> {
            let (meta, data) = crate::tensor_wire::to_wire(t)?;
            Ok(Self::new(op, &meta.shape, Encoding::Dense(meta.dtype), data.to_vec()))
        };
        let blocks = |q: &QTensor| -> Result<Self, WorkerError> {
            let format = format_of(q.dtype())
                .filter(|f| f.is_block())
                .ok_or_else(|| WorkerError::Weights(format!("{op}: weights of {:?} cannot be sent", q.dtype())))?;
            Ok(Self::new(op, q.shape().dims(), Encoding::Blocks(format), q.data()?.into_owned()))
        };
        Ok(Some(match w {
            OpWeights::None => return Ok(None),
            OpWeights::Embedding(e) => dense(e.embeddings())?,
            OpWeights::QEmbedding(q) => blocks(q)?,
            OpWeights::Norm(t) => dense(t)?,
            OpWeights::Linear(l) => dense(l.weight())?,
            OpWeights::QLinear(QMatMul::QTensor(q)) => blocks(q)?,
            OpWeights::QLinear(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => dense(t)?,
        }))
    }

    /// The op's weights on `dev`, checked against the model's shape and the run's dtype.
    pub fn into_weights(self, config: &ModelConfig, dev: &Device, dtype: DType) -> Result<OpWeights, WorkerError> {
        let op = self.meta.op;
        let bad = |m: String| WorkerError::Weights(format!("{op}: {m}"));
        let want = weight_shape(config, op.kind).ok_or_else(|| bad("an op without weights".into()))?;
        let got: Vec<u64> = self.meta.shape.iter().map(|&d| d as u64).collect();
        if got != want {
            return Err(bad(format!("shape {got:?}, the model needs {want:?}")));
        }
        self.meta.check(op).map_err(bad)?;
        if self.data.len() as u64 != self.meta.len {
            return Err(bad(format!("{} bytes, {} declared", self.data.len(), self.meta.len)));
        }
        let shape = self.meta.shape.clone();
        Ok(match self.meta.encoding {
            Encoding::Dense(dt) => {
                if dt != wire_dtype(dtype)? {
                    return Err(bad(format!("{dt:?} weights for a {dtype:?} run")));
                }
                let t = Tensor::from_raw_buffer(&self.data, candle_dtype(dt), &shape, dev)?;
                match op.kind {
                    OpKind::Embedding => OpWeights::Embedding(Embedding::new(t, config.hidden_size as usize)),
                    OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm => OpWeights::Norm(t),
                    _ => OpWeights::Linear(Linear::new(t, None)),
                }
            }
            Encoding::Blocks(f) => {
                let t = ggml_type(f).ok_or_else(|| bad(format!("{f} is not a block format")))?;
                if matches!(op.kind, OpKind::AttnNorm | OpKind::MlpNorm | OpKind::FinalNorm) {
                    return Err(bad("a norm in blocks".into()));
                }
                let q = QTensor::new(QStorage::from_data(Cow::Owned(self.data), dev, t)?, shape.as_slice())?;
                match op.kind {
                    OpKind::Embedding => OpWeights::QEmbedding(Arc::new(q)),
                    _ => OpWeights::QLinear(QMatMul::from_qtensor(q)?),
                }
            }
        })
    }
}

/// What the bytes of a run's weights are: its dtype, and how quantized weights are held.
pub fn variant(dtype: DType, dequantize: bool, quantize: Option<WeightFormat>) -> String {
    let dt = match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    };
    match (quantize, dequantize) {
        (Some(q), _) => format!("{dt}-quantize-{q}"),
        (None, true) => format!("{dt}-dequantized"),
        (None, false) => format!("{dt}-as-stored"),
    }
}

/// Lemurian's cache folder: `LEMUR_CACHE`, else `~/.cache/lemurian`.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("LEMUR_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lemurian")))
        .unwrap_or_else(|| PathBuf::from(".lemurian-cache"))
}

/// What the cache had for an op.
#[derive(Debug)]
pub enum Lookup {
    Hit(Blob),
    Miss,
    /// A file that failed its checks (named, with why): fetch again.
    Corrupt(String),
}

/// One checkpoint's weights in one variant, in a rank's cache.
#[derive(Debug, Clone)]
pub struct WeightCache {
    dir: PathBuf,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::File { path: path.display().to_string(), message: e.to_string() }
}

impl WeightCache {
    /// The cache of checkpoint `ck` under `root` (the hash is checked first: it names a folder).
    pub fn new(root: &Path, ck: &CheckpointRef, variant: &str) -> Result<Self, WorkerError> {
        ck.check().map_err(|e| WorkerError::Peer { rank: 0, message: e })?;
        Ok(Self { dir: root.join("weights").join(&ck.hash).join(variant) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, op: OpRef) -> PathBuf {
        self.dir.join(op.file_name())
    }

    /// The cached weights of `op`, checked against their checksum.
    pub fn get(&self, op: OpRef) -> Lookup {
        let path = self.path(op);
        let file = match std::fs::read(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => return Lookup::Corrupt(format!("{}: {e}", path.display())),
        };
        match read_blob(&file, op) {
            Ok((meta, at)) => {
                let mut data = file;
                data.drain(..at);
                Lookup::Hit(Blob { meta, data })
            }
            Err(e) => Lookup::Corrupt(format!("{}: {e}", path.display())),
        }
    }

    /// Stores `blob` atomically (a temporary file, synced, then renamed).
    pub fn put(&self, blob: &Blob) -> Result<(), WorkerError> {
        static N: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(&self.dir).map_err(|e| file_err(&self.dir, e))?;
        let path = self.path(blob.meta.op);
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            blob.meta.op.file_name()
        ));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&encode_blob(&blob.meta, &blob.data))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            file_err(&path, e)
        })
    }
}

/// A file's remembered hash, valid while its length and modification time hold.
#[derive(Debug, Serialize, Deserialize)]
struct Remembered {
    path: PathBuf,
    len: u64,
    mtime_ns: u128,
    sha256: String,
}

/// The hex SHA-256 of one file, remembered under `memo` by path, length and mtime.
fn file_hash(path: &Path, memo: &Path) -> Result<String, WorkerError> {
    let canon = path.canonicalize().map_err(|e| file_err(path, e))?;
    let md = std::fs::metadata(&canon).map_err(|e| file_err(path, e))?;
    let mtime_ns =
        md.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let key = lemur_protocol::blob::sha256_hex(canon.as_os_str().as_encoded_bytes());
    let memo_file = memo.join(format!("{key}.json"));
    if let Ok(text) = std::fs::read_to_string(&memo_file) {
        if let Ok(r) = serde_json::from_str::<Remembered>(&text) {
            if r.path == canon && r.len == md.len() && r.mtime_ns == mtime_ns && r.sha256.len() == 64 {
                return Ok(r.sha256);
            }
        }
    }
    let bar = crate::progress::bytes_bar(md.len(), &format!("hashing {}", path.display()));
    let mut f = std::fs::File::open(&canon).map_err(|e| file_err(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| file_err(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let sha256 = hex(&h.finalize());
    // Remembering is an optimisation: a read-only cache only costs the next start a rehash.
    let r = Remembered { path: canon, len: md.len(), mtime_ns, sha256: sha256.clone() };
    if std::fs::create_dir_all(memo).is_ok() {
        let tmp = memo.join(format!(".tmp-{}-{key}", std::process::id()));
        if std::fs::write(&tmp, serde_json::to_vec(&r).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, &memo_file);
        }
    }
    Ok(sha256)
}

/// The content hash of a checkpoint made of `files`: SHA-256 over each file's name, length
/// and SHA-256 (so renaming the folder keeps it, and changing any byte changes it).
pub fn checkpoint_hash(files: &[PathBuf], cache_root: &Path) -> Result<String, WorkerError> {
    let memo = cache_root.join("checkpoints");
    let mut h = Sha256::new();
    h.update(b"lemurian checkpoint v1\0");
    for f in files {
        let name = f.file_name().map(|n| n.as_encoded_bytes().to_vec()).unwrap_or_default();
        let len = std::fs::metadata(f).map_err(|e| file_err(f, e))?.len();
        h.update((name.len() as u64).to_le_bytes());
        h.update(&name);
        h.update(len.to_le_bytes());
        h.update(file_hash(f, &memo)?.as_bytes());
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_follows_content_not_path_and_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        for d in [&a, &b] {
            std::fs::write(d.join("m.gguf"), b"same bytes").unwrap();
        }
        let cache = dir.path().join("cache");
        let ha = checkpoint_hash(&[a.join("m.gguf")], &cache).unwrap();
        assert_eq!(ha, checkpoint_hash(&[b.join("m.gguf")], &cache).unwrap());
        assert_eq!(ha.len(), 64);
        assert_eq!(std::fs::read_dir(cache.join("checkpoints")).unwrap().count(), 2);
        // Independently: SHA-256 over name, length and the file's own SHA-256.
        let mut h = Sha256::new();
        h.update(b"lemurian checkpoint v1\0");
        h.update(6u64.to_le_bytes());
        h.update(b"m.gguf");
        h.update(10u64.to_le_bytes());
        h.update(lemur_protocol::blob::sha256_hex(b"same bytes").as_bytes());
        assert_eq!(ha, hex(&h.finalize()));
        // Another content (the length changes, so the remembered hash is not reused).
        std::fs::write(b.join("m.gguf"), b"other bytes").unwrap();
        assert_ne!(ha, checkpoint_hash(&[b.join("m.gguf")], &cache).unwrap());
    }

    #[test]
    fn blobs_round_trip_dense_and_quantized_and_the_cache_catches_corruption() {
        let cfg = ModelConfig::tiny();
        let dev = Device::Cpu;
        let (h, q) = (cfg.hidden_size as usize, cfg.q_dim() as usize);
        let w = Tensor::randn(0f32, 1.0, (q, h), &dev).unwrap();
        let op = OpRef { kind: OpKind::QProj, layer: Some(1) };
        let dense = Blob::of(op, &OpWeights::Linear(Linear::new(w.clone(), None))).unwrap().unwrap();
        assert_eq!(dense.meta.encoding, Encoding::Dense(lemur_protocol::wire::WireDType::F32));
        let back = dense.clone().into_weights(&cfg, &dev, DType::F32).unwrap();
        let OpWeights::Linear(l) = back else { panic!("not linear") };
        assert_eq!(l.weight().to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert!(dense.clone().into_weights(&cfg, &dev, DType::F16).unwrap_err().to_string().contains("F32"));

        let qt = QTensor::quantize(&w, candle_core::quantized::GgmlDType::Q8_0).unwrap();
        let want = qt.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
        let blocks = Blob::of(op, &OpWeights::QLinear(QMatMul::from_qtensor(qt).unwrap())).unwrap().unwrap();
        assert_eq!(blocks.meta.encoding, Encoding::Blocks(WeightFormat::Q8_0));
        let OpWeights::QLinear(m) = blocks.clone().into_weights(&cfg, &dev, DType::F16).unwrap() else { panic!() };
        let OpWeights::QLinear(QMatMul::QTensor(qt)) = OpWeights::QLinear(m) else { panic!("not blocks") };
        assert_eq!(qt.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap(), want);
        let wrong = Blob {
            meta: BlobMeta { op: OpRef { kind: OpKind::KProj, ..op }, ..blocks.meta.clone() },
            ..blocks.clone()
        };
        assert!(wrong.into_weights(&cfg, &dev, DType::F32).unwrap_err().to_string().contains("shape"));

        let dir = tempfile::tempdir().unwrap();
        let ck = CheckpointRef { hash: "ab".repeat(32), config: cfg };
        let cache = WeightCache::new(dir.path(), &ck, "f32-as-stored").unwrap();
        assert!(matches!(cache.get(op), Lookup::Miss));
        cache.put(&blocks).unwrap();
        let Lookup::Hit(got) = cache.get(op) else { panic!("a miss after put") };
        assert_eq!(got, blocks);
        let path = cache.dir().join(op.file_name());
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(cache.get(op), Lookup::Corrupt(m) if m.contains("checksum")));
        let bad = CheckpointRef { hash: "../../../etc/passwd".into(), ..ck };
        assert!(WeightCache::new(dir.path(), &bad, "x").is_err());
    }
}
