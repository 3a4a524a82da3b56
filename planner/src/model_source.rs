//! Resolving `--model`: a built-in preset name, a Hugging Face directory, or a `config.json` path.

use std::path::{Path, PathBuf};

use lemur_protocol::gguf::{gguf_file_of, GgufHeader};
use lemur_protocol::model::PRESETS;
use lemur_protocol::{FieldError, ModelConfig};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("`{spec}` is neither a preset ({}) nor an existing path", PRESETS.join(", "))]
    Unknown { spec: String },
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: FieldError },
    #[error("{path}: {message}")]
    Gguf { path: PathBuf, message: String },
}

/// Resolves a model given by preset name or path (Hugging Face directory, `config.json`,
/// or GGUF file).
pub fn load_model(spec: &str) -> Result<ModelConfig, ModelError> {
    if let Some(cfg) = ModelConfig::preset(spec) {
        return Ok(cfg);
    }
    let path = Path::new(spec);
    if !path.exists() {
        return Err(ModelError::Unknown { spec: spec.to_string() });
    }
    if let Some(file) = gguf_file_of(path) {
        let mut f = std::fs::File::open(&file).map_err(|source| ModelError::Io { path: file.clone(), source })?;
        let header =
            GgufHeader::read(&mut f).map_err(|e| ModelError::Gguf { path: file.clone(), message: e.to_string() })?;
        let name = file.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        return header.model_config(&name).map_err(|source| ModelError::Invalid { path: file, source });
    }
    let (file, name) = if path.is_dir() {
        (path.join("config.json"), path.file_name())
    } else {
        (path.to_path_buf(), path.parent().and_then(Path::file_name))
    };
    let name = name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let text = std::fs::read_to_string(&file).map_err(|source| ModelError::Io { path: file.clone(), source })?;
    ModelConfig::from_hf_json(&name, &text).map_err(|source| ModelError::Invalid { path: file, source })
}

/// How `spec`'s weights are stored, when it is a GGUF file that says (`general.file_type`).
pub fn weights_of(spec: &str) -> Option<lemur_protocol::WeightFormat> {
    let file = gguf_file_of(Path::new(spec))?;
    let mut f = std::fs::File::open(&file).ok()?;
    GgufHeader::read(&mut f).ok()?.weight_format()
}
