//! Adapter checkpoints in the layout PEFT uses (`adapter_model.safetensors`,
//! `adapter_config.json`), plus the AdamW moments (`optimizer.safetensors`) and the trainer
//! state (`trainer_state.json`) for resuming. Written atomically: into a temporary
//! directory, then renamed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lemur_protocol::OpKind;
use serde::{Deserialize, Serialize};

use crate::error::WorkerError;
use crate::lora::AdapterTensors as AdapterGrads;

/// Suffixes of the AdamW moments of an adapter tensor.
pub const EXP_AVG: &str = ".exp_avg";
pub const EXP_AVG_SQ: &str = ".exp_avg_sq";

/// What resuming needs besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Mean loss of every step so far.
    pub losses: Vec<f64>,
}

/// The adapters' shape, as PEFT's `adapter_config.json` states it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<OpKind>,
    pub base_model: String,
}

fn io(path: &Path, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::File { path: path.display().to_string(), message: e.to_string() }
}

fn to_tensors(map: &AdapterGrads, keep: impl Fn(&str) -> bool) -> Result<HashMap<String, Tensor>, WorkerError> {
    let mut out = HashMap::new();
    for (name, (shape, values)) in map {
        if keep(name) {
            out.insert(name.clone(), Tensor::from_vec(values.clone(), shape.as_slice(), &Device::Cpu)?);
        }
    }
    Ok(out)
}

/// Writes `dir/checkpoint-{step}` and returns its path.
pub fn write(
    dir: &Path,
    cfg: &AdapterConfig,
    state: &TrainerState,
    tensors: &AdapterGrads,
) -> Result<PathBuf, WorkerError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let final_dir = dir.join(format!("checkpoint-{}", state.step));
    let tmp = dir.join(format!(".tmp-checkpoint-{}", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    let is_moment = |n: &str| n.ends_with(EXP_AVG) || n.ends_with(EXP_AVG_SQ);
    candle_core::safetensors::save(&to_tensors(tensors, |n| !is_moment(n))?, tmp.join("adapter_model.safetensors"))?;
    candle_core::safetensors::save(&to_tensors(tensors, is_moment)?, tmp.join("optimizer.safetensors"))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "target_modules": cfg.targets.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "base_model_name_or_path": cfg.base_model,
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| io(&tmp, e))?;
    std::fs::write(tmp.join("adapter_config.json"), text).map_err(|e| io(&tmp, e))?;
    let st = serde_json::to_string_pretty(state).map_err(|e| io(&tmp, e))?;
    std::fs::write(tmp.join("trainer_state.json"), st).map_err(|e| io(&tmp, e))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| io(&final_dir, e))?;
    Ok(final_dir)
}

/// The newest complete checkpoint under `dir`.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n = p.file_name()?.to_str()?.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            p.join("trainer_state.json").exists().then_some((n, p))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// Reads a checkpoint (or a bare PEFT adapter directory): its config, its tensors (moments
/// too, when present) and its trainer state.
pub fn read(dir: &Path) -> Result<(AdapterConfig, AdapterGrads, Option<TrainerState>), WorkerError> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| io(&cfg_path, e))?;
    let rank = v["r"].as_u64().ok_or_else(|| io(&cfg_path, "missing `r`"))? as usize;
    let alpha = v["lora_alpha"].as_f64().ok_or_else(|| io(&cfg_path, "missing `lora_alpha`"))?;
    let targets = v["target_modules"]
        .as_array()
        .ok_or_else(|| io(&cfg_path, "missing `target_modules`"))?
        .iter()
        .map(|t| {
            t.as_str()
                .and_then(OpKind::parse)
                .filter(|k| k.is_linear())
                .ok_or_else(|| io(&cfg_path, format!("unsupported target {t}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let base_model = v["base_model_name_or_path"].as_str().unwrap_or("").to_string();
    let mut tensors = AdapterGrads::new();
    for file in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let path = dir.join(file);
        if !path.exists() {
            continue;
        }
        for (name, t) in candle_core::safetensors::load(&path, &Device::Cpu)? {
            let t = t.to_dtype(candle_core::DType::F32)?;
            tensors.insert(name, (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?));
        }
    }
    let state_path = dir.join("trainer_state.json");
    let state = match std::fs::read_to_string(&state_path) {
        Ok(t) => Some(serde_json::from_str(&t).map_err(|e| io(&state_path, e))?),
        Err(_) => None,
    };
    Ok((AdapterConfig { rank, alpha, targets, base_model }, tensors, state))
}

/// Where a resumed run starts: the newest checkpoint in an output directory.
#[derive(Debug, Clone)]
pub struct Resume {
    pub path: PathBuf,
    pub state: TrainerState,
    pub tensors: AdapterGrads,
}

/// The newest checkpoint in `dir`, checked against the adapters the run trains (rank and
/// targets must match; alpha may differ, as PEFT allows).
pub fn resume(dir: &Path, want: &AdapterConfig) -> Result<Resume, WorkerError> {
    let path = latest(dir).ok_or_else(|| io(dir, "no checkpoint-N with a trainer_state.json to resume from"))?;
    let (cfg, tensors, state) = read(&path)?;
    if cfg.rank != want.rank || cfg.targets != want.targets {
        return Err(io(
            &path,
            format!(
                "adapters of rank {} on {:?}; the plan asks for rank {} on {:?}",
                cfg.rank, cfg.targets, want.rank, want.targets
            ),
        ));
    }
    let state = state.ok_or_else(|| io(&path, "no trainer_state.json"))?;
    Ok(Resume { path, state, tensors })
}

/// Appends one JSON line per optimizer step to a loss log (`loss.jsonl`).
#[derive(Debug, Clone)]
pub struct LossLog {
    pub path: PathBuf,
}

impl LossLog {
    pub fn append(&self, step: &impl Serialize) -> Result<(), WorkerError> {
        use std::io::Write;
        let line = serde_json::to_string(step).map_err(|e| io(&self.path, e))?;
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(|e| io(&self.path, e))?;
        writeln!(f, "{line}").map_err(|e| io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rank: usize) -> AdapterConfig {
        AdapterConfig { rank, alpha: 16.0, targets: vec![OpKind::QProj, OpKind::VProj], base_model: "m".into() }
    }

    #[test]
    fn resume_takes_the_newest_checkpoint_and_checks_its_shape() {
        let dir = tempfile::tempdir().unwrap();
        let e = resume(dir.path(), &cfg(4)).unwrap_err().to_string();
        assert!(e.contains("no checkpoint"), "{e}");
        let name = crate::lora::peft_name(OpKind::QProj, 0, "lora_A");
        let tensors = AdapterGrads::from([(name.clone(), (vec![4, 2], vec![0.5; 8]))]);
        for step in [10, 20] {
            write(dir.path(), &cfg(4), &TrainerState { step, losses: vec![1.0; step as usize] }, &tensors).unwrap();
        }
        let r = resume(dir.path(), &cfg(4)).unwrap();
        assert!(r.path.ends_with("checkpoint-20"), "{}", r.path.display());
        assert_eq!(r.state.step, 20);
        assert_eq!(r.tensors[&name], (vec![4, 2], vec![0.5; 8]));
        let e = resume(dir.path(), &cfg(8)).unwrap_err().to_string();
        assert!(e.contains("rank 4") && e.contains("rank 8") && e.contains("checkpoint-20"), "{e}");
    }

    #[test]
    fn the_loss_log_gets_one_line_per_step() {
        let dir = tempfile::tempdir().unwrap();
        let log = LossLog { path: dir.path().join("loss.jsonl") };
        log.append(&serde_json::json!({"step": 1, "loss": 2.5})).unwrap();
        log.append(&serde_json::json!({"step": 2, "loss": 2.0})).unwrap();
        let text = std::fs::read_to_string(&log.path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["loss"], 2.0);
    }
}
