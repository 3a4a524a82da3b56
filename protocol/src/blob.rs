//! Weights as they travel from the leader to a rank and lie in a rank's cache: one blob per
//! op, its bytes in the format the plan runs (dense in the run's dtype, or a GGUF block
//! format as stored), named by the checkpoint's content hash and checked by SHA-256.
//!
//! A cache file is `b"LMWB" | u32 LE header length | header (JSON [`BlobMeta`]) | bytes`.
//! [`BlobMeta::expected_len`] is computed from the shape and encoding alone, so a reader
//! can refuse a lying length before it allocates, and [`read_blob`] checks the bytes
//! against the header's SHA-256 before anyone uses them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::wire::WireDType;
use crate::{ModelConfig, OpKind, WeightFormat};

/// First bytes of a cache file.
pub const BLOB_MAGIC: [u8; 4] = *b"LMWB";
/// The largest blob header a reader accepts.
pub const MAX_BLOB_HEADER: usize = 64 << 10;
/// Bytes per `WeightChunk` frame.
pub const CHUNK_BYTES: usize = 4 << 20;

/// The checkpoint the leader serves: its content hash (what caches are keyed by) and its
/// shape as its own `config.json` or GGUF header states it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRef {
    /// Hex SHA-256 over the checkpoint's files (name, length and SHA-256 of each).
    pub hash: String,
    pub config: ModelConfig,
}

impl CheckpointRef {
    /// Checks that `hash` is what the leader sends (64 hex digits): it names a folder.
    pub fn check(&self) -> Result<(), String> {
        if self.hash.len() == 64 && self.hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            Ok(())
        } else {
            Err(format!("checkpoint hash `{}` is not 64 lowercase hex digits", self.hash.escape_debug()))
        }
    }
}

/// One op's weights: which op, in which layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpRef {
    pub kind: OpKind,
    pub layer: Option<u32>,
}

impl OpRef {
    /// The cache file's name: `embedding.bin`, `q_proj.3.bin`.
    pub fn file_name(self) -> String {
        match self.layer {
            Some(l) => format!("{}.{l}.bin", self.kind.name()),
            None => format!("{}.bin", self.kind.name()),
        }
    }
}

impl std::fmt::Display for OpRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.layer {
            Some(l) => write!(f, "{} of layer {l}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

/// How a blob's bytes encode its tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Encoding {
    /// Little-endian elements of this dtype.
    Dense(WireDType),
    /// GGUF blocks of this format (rows of Q and K already in Hugging Face order).
    Blocks(WeightFormat),
}

/// What a blob holds and how to check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobMeta {
    pub op: OpRef,
    pub shape: Vec<usize>,
    pub encoding: Encoding,
    /// Bytes of data.
    pub len: u64,
    /// Hex SHA-256 of the data.
    pub sha256: String,
}

impl BlobMeta {
    /// The bytes `shape` takes in `encoding`, or why it cannot be stored so (an overflow, a
    /// row that blocks do not divide, a mix or dense as a block format, an id dtype).
    pub fn expected_len(&self) -> Result<u64, String> {
        let elems = self
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| format!("shape {:?} overflows", self.shape))?;
        match self.encoding {
            Encoding::Dense(WireDType::U32 | WireDType::U8) => Err("weights are not ids or bytes".into()),
            Encoding::Dense(dt) => elems.checked_mul(dt.size() as u64).ok_or_else(|| "size overflows".into()),
            Encoding::Blocks(f) => {
                let (bytes, block) = f.block_layout().ok_or_else(|| format!("{f} is not one block format"))?;
                let row = *self.shape.last().ok_or("a blocked tensor with no dimensions")? as u64;
                if !row.is_multiple_of(block) {
                    return Err(format!("rows of {row} weights do not split into {f}'s blocks of {block}"));
                }
                Ok(elems / block * bytes)
            }
        }
    }

    /// Checks the metadata for op `want`: the op, the length its shape implies, the hash's form.
    pub fn check(&self, want: OpRef) -> Result<(), String> {
        if self.op != want {
            return Err(format!("sent {} where {want} was due", self.op));
        }
        let expected = self.expected_len()?;
        if self.len != expected {
            return Err(format!(
                "{} declares {} bytes, but {:?} in {:?} is {expected}",
                want, self.len, self.shape, self.encoding
            ));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{want}: a checksum that is not 64 hex digits"));
        }
        Ok(())
    }
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cache file's bytes: magic, header, data.
pub fn encode_blob(meta: &BlobMeta, data: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(meta).expect("a blob header serializes");
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&BLOB_MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out
}

/// Why a cache file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("not a Lemurian weight file (no LMWB magic)")]
    Magic,
    #[error("a header of {0} bytes is cut short or too long")]
    Header(usize),
    #[error("malformed header: {0}")]
    Meta(String),
    #[error("{0} bytes of data, the header says {1}")]
    Length(u64, u64),
    #[error("the data fails its checksum")]
    Checksum,
}

/// Parses and checks a cache file for op `want`: header, length and checksum. Returns the
/// header and where the data starts in `file`.
pub fn read_blob(file: &[u8], want: OpRef) -> Result<(BlobMeta, usize), BlobError> {
    if file.get(..4) != Some(&BLOB_MAGIC[..]) {
        return Err(BlobError::Magic);
    }
    let n = file.get(4..8).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let header = file.get(8..8 + n).filter(|_| n <= MAX_BLOB_HEADER).ok_or(BlobError::Header(n))?;
    let meta: BlobMeta = serde_json::from_slice(header).map_err(|e| BlobError::Meta(e.to_string()))?;
    meta.check(want).map_err(BlobError::Meta)?;
    let data = &file[8 + n..];
    if data.len() as u64 != meta.len {
        return Err(BlobError::Length(data.len() as u64, meta.len));
    }
    if sha256_hex(data) != meta.sha256 {
        return Err(BlobError::Checksum);
    }
    Ok((meta, 8 + n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(shape: Vec<usize>, encoding: Encoding, data: &[u8]) -> BlobMeta {
        let op = OpRef { kind: OpKind::QProj, layer: Some(2) };
        BlobMeta { op, shape, encoding, len: data.len() as u64, sha256: sha256_hex(data) }
    }

    #[test]
    fn lengths_follow_from_shape_and_encoding() {
        let m = |shape: Vec<usize>, e| BlobMeta { len: 0, ..meta(shape, e, b"") }.expected_len();
        assert_eq!(m(vec![3, 4], Encoding::Dense(WireDType::F16)), Ok(24));
        assert_eq!(m(vec![2, 64], Encoding::Blocks(WeightFormat::Q8_0)), Ok(2 * 2 * 34));
        assert_eq!(m(vec![1, 512], Encoding::Blocks(WeightFormat::Q4K)), Ok(2 * 144));
        assert!(m(vec![1, 100], Encoding::Blocks(WeightFormat::Q4_0)).unwrap_err().contains("blocks of 32"));
        assert!(m(vec![1, 256], Encoding::Blocks(WeightFormat::Q4KM)).is_err());
        assert!(m(vec![usize::MAX, 4], Encoding::Dense(WireDType::F32)).is_err());
        assert!(m(vec![4], Encoding::Dense(WireDType::U32)).is_err());
    }

    #[test]
    fn a_cache_file_round_trips_and_every_corruption_is_caught() {
        let data: Vec<u8> = (0..96u8).collect();
        let m = meta(vec![2, 24], Encoding::Dense(WireDType::F16), &data);
        let file = encode_blob(&m, &data);
        let want = m.op;
        let (got, at) = read_blob(&file, want).unwrap();
        assert_eq!((got, &file[at..]), (m.clone(), &data[..]));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(read_blob(&flipped, want), Err(BlobError::Checksum));
        assert_eq!(read_blob(&file[..file.len() - 1], want), Err(BlobError::Length(95, 96)));
        assert_eq!(read_blob(b"LMWX", want), Err(BlobError::Magic));
        assert_eq!(read_blob(&file[..10], want).unwrap_err(), BlobError::Header(file[4] as usize));
        let other = OpRef { kind: OpKind::KProj, layer: Some(2) };
        assert!(matches!(read_blob(&file, other), Err(BlobError::Meta(m)) if m.contains("k_proj")));
        let lying = BlobMeta { len: 95, ..m };
        assert!(matches!(read_blob(&encode_blob(&lying, &data[..95]), want), Err(BlobError::Meta(_))));
    }

    #[test]
    fn checkpoint_hashes_must_be_folder_safe() {
        let config = crate::ModelConfig::tiny();
        let ok = CheckpointRef { hash: "a".repeat(64), config };
        assert!(ok.check().is_ok());
        for bad in ["../../etc".to_string(), "A".repeat(64), "a".repeat(63)] {
            assert!(CheckpointRef { hash: bad, ..ok.clone() }.check().is_err());
        }
    }
}
