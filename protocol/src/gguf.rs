//! A bounds-checked reader for GGUF headers (metadata and tensor directory), enough to
//! derive a [`ModelConfig`] and a tokenizer without loading tensor data. Tensor data is
//! read by the worker (candle's GGUF support); this module never allocates more than the
//! file's own size says it holds.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::FieldError;
use crate::ModelConfig;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U64(v) => Some(v),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them (innermost first).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

/// A GGUF file's header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file (magic {0:#x})")]
    Magic(u32),
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    Version(u32),
    #[error("malformed GGUF header: {0}")]
    Malformed(String),
}

struct Reader<'a, R> {
    r: &'a mut R,
    left: u64,
}

impl<R: Read> Reader<'_, R> {
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, GgufError> {
        if n > self.left {
            return Err(GgufError::Malformed(format!("a field claims {n} bytes but only {} remain", self.left)));
        }
        let mut v = vec![0u8; n as usize];
        self.r.read_exact(&mut v)?;
        self.left -= n;
        Ok(v)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap_or_default()))
    }
    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.u64()?;
        String::from_utf8(self.bytes(n)?).map_err(|_| GgufError::Malformed("a string is not UTF-8".into()))
    }
    fn value(&mut self, ty: u32, depth: u32) -> Result<GgufValue, GgufError> {
        let fixed = |b: Vec<u8>| -> [u8; 8] {
            let mut a = [0u8; 8];
            a[..b.len()].copy_from_slice(&b);
            a
        };
        Ok(match ty {
            0 => GgufValue::U64(u64::from(self.bytes(1)?[0])),
            1 => GgufValue::I64(i64::from(self.bytes(1)?[0] as i8)),
            2 => GgufValue::U64(u64::from_le_bytes(fixed(self.bytes(2)?))),
            3 => {
                let b = self.bytes(2)?;
                GgufValue::I64(i64::from(i16::from_le_bytes([b[0], b[1]])))
            }
            4 => GgufValue::U64(u64::from(self.u32()?)),
            5 => GgufValue::I64(i64::from(self.u32()? as i32)),
            6 => GgufValue::F64(f64::from(f32::from_bits(self.u32()?))),
            7 => GgufValue::Bool(self.bytes(1)?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(GgufError::Malformed("arrays nested too deeply".into()));
                }
                let inner = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least one byte: a count beyond that is a lie.
                if n > self.left {
                    return Err(GgufError::Malformed(format!("an array claims {n} elements in {} bytes", self.left)));
                }
                let mut v = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(self.u64()? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64()?)),
            other => return Err(GgufError::Malformed(format!("unknown value type {other}"))),
        })
    }
}

impl GgufHeader {
    /// Reads the header of a GGUF stream.
    pub fn read<R: Read + Seek>(r: &mut R) -> Result<Self, GgufError> {
        let len = r.seek(SeekFrom::End(0))?;
        r.seek(SeekFrom::Start(0))?;
        let mut rd = Reader { r, left: len };
        let magic = rd.u32()?;
        if magic != 0x4655_4747 {
            return Err(GgufError::Magic(magic));
        }
        let version = rd.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let n_tensors = rd.u64()?;
        let n_kv = rd.u64()?;
        if n_tensors > rd.left || n_kv > rd.left {
            return Err(GgufError::Malformed("counts exceed the file".into()));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = rd.string()?;
            let ty = rd.u32()?;
            let v = rd.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16) as usize);
        for _ in 0..n_tensors {
            let name = rd.string()?;
            let nd = rd.u32()?;
            if nd > 8 {
                return Err(GgufError::Malformed(format!("tensor `{name}` has {nd} dimensions")));
            }
            let dims = (0..nd).map(|_| rd.u64()).collect::<Result<Vec<_>, _>>()?;
            let ggml_type = rd.u32()?;
            let offset = rd.u64()?;
            tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
        }
        Ok(Self { version, metadata, tensors })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// How the file says its weights are stored (`general.file_type`), if it says.
    pub fn weight_format(&self) -> Option<crate::WeightFormat> {
        crate::WeightFormat::from_gguf_file_type(self.get("general.file_type")?.as_u64()?)
    }

    /// The model's shape from `{arch}.*` metadata (Llama-family architectures).
    pub fn model_config(&self, name: &str) -> Result<ModelConfig, FieldError> {
        let arch = self
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| FieldError::new("general.architecture", "missing"))?
            .to_string();
        if arch != "llama" && arch != "mistral" {
            return Err(FieldError::new("general.architecture", format!("`{arch}` is not supported (llama, mistral)")));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let int = |k: &str| -> Result<u64, FieldError> {
            self.get(&key(k))
                .and_then(GgufValue::as_u64)
                .ok_or_else(|| FieldError::new(key(k), "missing or not an integer"))
        };
        let heads = int("attention.head_count")?;
        let hidden = int("embedding_length")?;
        let vocab = match self.get(&key("vocab_size")).and_then(GgufValue::as_u64) {
            Some(v) => v,
            None => {
                self.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array).map(|a| a.len() as u64).ok_or_else(
                    || FieldError::new(key("vocab_size"), "missing, and no tokenizer.ggml.tokens to count"),
                )?
            }
        };
        let head_dim = match self.get(&key("attention.key_length")).and_then(GgufValue::as_u64) {
            Some(d) => d,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        let cfg = ModelConfig {
            name: name.to_string(),
            architecture: arch.clone(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads: heads,
            num_kv_heads: self.get(&key("attention.head_count_kv")).and_then(GgufValue::as_u64).unwrap_or(heads),
            head_dim,
            sliding_window: self.get(&key("attention.sliding_window")).and_then(GgufValue::as_u64),
            rope_theta: self.get(&key("rope.freq_base")).and_then(GgufValue::as_f64).unwrap_or(10_000.0),
            rms_norm_eps: self
                .get(&key("attention.layer_norm_rms_epsilon"))
                .and_then(GgufValue::as_f64)
                .unwrap_or(1e-5),
            max_position_embeddings: self.get(&key("context_length")).and_then(GgufValue::as_u64).unwrap_or(4096),
            tie_word_embeddings: !self.tensors.iter().any(|t| t.name == "output.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The GGUF file a path names: the file itself, or the only `*.gguf` in a directory that
/// has no `config.json` (a Hugging Face directory wins).
pub fn gguf_file_of(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return path.extension().is_some_and(|x| x == "gguf").then(|| path.to_path_buf());
    }
    if path.join("config.json").exists() {
        return None;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    (found.len() == 1).then(|| found.remove(0))
}
