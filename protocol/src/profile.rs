//! Machine and link profiles: what each machine can do, as measured, and how machines are joined.
//!
//! The TOML files under `profiles/` deserialize into these types; the planner loads them
//! (naming the file on error) and the plan file carries them so a plan is self-describing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{positive, FieldError};
use crate::WeightFormat;

/// Numeric precision of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(DType::F32),
            "f16" => Some(DType::F16),
            "bf16" => Some(DType::Bf16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How element-wise work runs on a machine, which decides how many kernels and passes
/// over memory the cost model charges for norms, RoPE, SiLU and residual adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelStyle {
    /// One kernel per primitive, norms upcast to f32 (PyTorch eager, as Hugging Face runs).
    Eager,
    /// Fused norm, RoPE and softmax kernels (candle, MLX).
    Fused,
}

/// A measured throughput curve: `y` (TFLOP/s) at sizes `x`, interpolated log-log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Curve {
    /// Problem sizes, strictly increasing.
    pub size: Vec<f64>,
    /// Achieved TFLOP/s at each size.
    pub tflops: Vec<f64>,
}

impl Curve {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.size.is_empty() {
            return Err(FieldError::new("size", "the curve has no points"));
        }
        if self.size.len() != self.tflops.len() {
            return Err(FieldError::new(
                "tflops",
                format!("has {} values but `size` has {}", self.tflops.len(), self.size.len()),
            ));
        }
        for (i, &s) in self.size.iter().enumerate() {
            positive(&format!("size[{i}]"), s)?;
            if i > 0 && s <= self.size[i - 1] {
                return Err(FieldError::new(
                    format!("size[{i}]"),
                    format!("sizes must be strictly increasing, but {s} follows {}", self.size[i - 1]),
                ));
            }
        }
        for (i, &t) in self.tflops.iter().enumerate() {
            positive(&format!("tflops[{i}]"), t)?;
        }
        Ok(())
    }

    /// Throughput at `size`: log-log interpolation between points, clamped to the end points.
    ///
    /// Clamping (rather than extrapolating) keeps tiny problems from being priced as slower
    /// than the smallest one measured and big ones from exceeding the best measured rate.
    pub fn at(&self, size: f64) -> f64 {
        let n = self.size.len();
        if size <= self.size[0] {
            return self.tflops[0];
        }
        if size >= self.size[n - 1] {
            return self.tflops[n - 1];
        }
        let i = self.size.partition_point(|&s| s <= size);
        let (x0, x1) = (self.size[i - 1].ln(), self.size[i].ln());
        let (y0, y1) = (self.tflops[i - 1].ln(), self.tflops[i].ln());
        let t = (size.ln() - x0) / (x1 - x0);
        (y0 + t * (y1 - y0)).exp()
    }

    /// The best throughput on the curve.
    pub fn peak(&self) -> f64 {
        self.tflops.iter().copied().fold(0.0, f64::max)
    }
}

/// Memory of one machine, in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// Physical (unified) memory.
    pub total_bytes: u64,
    /// What the accelerator may use for weights, KV cache and activations.
    pub usable_bytes: u64,
    /// The largest single buffer the device will allocate.
    pub max_alloc_bytes: u64,
}

/// Spec-sheet peaks, for reporting achieved-versus-theoretical.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peak {
    /// Theoretical TFLOP/s per dtype (`f16 = 24.0`).
    pub tflops: BTreeMap<DType, f64>,
    /// Theoretical memory bandwidth, GB/s.
    pub bandwidth_gbps: f64,
}

/// Achieved memory bandwidth, GB/s (10^9 bytes per second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bandwidth {
    pub read_gbps: f64,
    pub copy_gbps: f64,
    /// The rate a matrix-vector product streams its weight, by dtype (decode's GEMMs).
    /// Where present it prices memory-bound GEMMs of that dtype instead of `read_gbps`:
    /// on a CPU, candle's bf16 matrix-vector product streams far slower than its f32 one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gemv_gbps: BTreeMap<DType, f64>,
}

/// Measured throughput of element-wise kernels, GB/s of their minimal traffic (what a
/// fused kernel must read and write). Present in profiles measured by `lemur-profile`;
/// when absent the cost model derives element-wise time from the copy bandwidth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Elementwise {
    pub rms_norm_gbps: f64,
    pub rope_gbps: f64,
    pub silu_mul_gbps: f64,
    pub add_gbps: f64,
    /// The training backward of RMSNorm and SiLU-multiply (the workers' hand-written
    /// VJPs). RoPE's backward is a RoPE and a residual's a pass-through, priced as forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_backward_gbps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silu_mul_backward_gbps: Option<f64>,
    /// Training's loss: the softmax over the logits, and its gradient (softmax - one-hot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_entropy_gbps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_entropy_backward_gbps: Option<f64>,
}

impl Elementwise {
    pub fn validate(&self) -> Result<(), FieldError> {
        positive("elementwise.rms_norm_gbps", self.rms_norm_gbps)?;
        positive("elementwise.rope_gbps", self.rope_gbps)?;
        positive("elementwise.silu_mul_gbps", self.silu_mul_gbps)?;
        positive("elementwise.add_gbps", self.add_gbps)?;
        if let Some(v) = self.rms_norm_backward_gbps {
            positive("elementwise.rms_norm_backward_gbps", v)?;
        }
        for (field, v) in [
            ("elementwise.silu_mul_backward_gbps", self.silu_mul_backward_gbps),
            ("elementwise.cross_entropy_gbps", self.cross_entropy_gbps),
            ("elementwise.cross_entropy_backward_gbps", self.cross_entropy_backward_gbps),
        ] {
            if let Some(v) = v {
                positive(field, v)?;
            }
        }
        Ok(())
    }
}

/// How fast a machine runs linear ops on weights stored in one GGUF block format, with the
/// workers' quantized kernels (`lemur-profile` measures them; `refine` learns them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantRates {
    /// Weight bytes as stored per second of a matrix-vector product (decode: one row of
    /// activations against the whole weight), GB/s.
    pub gemv_gbps: f64,
    /// Throughput of the quantized GEMM (prefill's many rows) by equivalent size
    /// `N = cbrt(m n k)`, TFLOP/s.
    pub gemm: Curve,
    /// Dense bytes written per second when a whole weight is dequantized (training over a
    /// quantized base does it for each linear op's forward and input gradient), GB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dequantize_gbps: Option<f64>,
    /// Where the figures come from: the measurement, or how an estimate was derived.
    pub source: String,
    /// Derived from other figures rather than measured: plans priced with it say so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimate: bool,
}

impl QuantRates {
    pub fn validate(&self) -> Result<(), FieldError> {
        positive("gemv_gbps", self.gemv_gbps)?;
        self.gemm.validate().map_err(|e| e.within("gemm"))?;
        if let Some(v) = self.dequantize_gbps {
            positive("dequantize_gbps", v)?;
        }
        Ok(())
    }
}

/// Everything the planner knows about one kind of machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineProfile {
    /// Short name, unique within a cluster description (`m5-pro`).
    pub name: String,
    /// Free text: the machine and how it was measured.
    pub description: String,
    /// How element-wise work runs here (see [`KernelStyle`]).
    pub kernel_style: KernelStyle,
    /// Fixed cost of launching one kernel, microseconds.
    pub dispatch_overhead_us: f64,
    pub memory: Memory,
    /// Spec-sheet peaks, where the device has them (a CPU's are not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak: Option<Peak>,
    pub bandwidth: Bandwidth,
    /// Measured element-wise throughput (profiles from `lemur-profile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elementwise: Option<Elementwise>,
    /// Square GEMM throughput by N, per dtype.
    pub gemm: BTreeMap<DType, Curve>,
    /// Attention throughput by sequence length, per dtype.
    pub attention: BTreeMap<DType, Curve>,
    /// Linear ops on quantized weights, per block format (`[quantized.q4_k]`). A format
    /// without an entry is priced at the dense rates of the run's dtype (plans say so).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub quantized: BTreeMap<WeightFormat, QuantRates>,
}

impl MachineProfile {
    /// Checks every value; the error's field path is relative to the file's root.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.name.trim().is_empty() {
            return Err(FieldError::new("name", "must not be empty"));
        }
        if !self.dispatch_overhead_us.is_finite() || self.dispatch_overhead_us < 0.0 {
            return Err(FieldError::new(
                "dispatch_overhead_us",
                format!("must be finite and non-negative, got {}", self.dispatch_overhead_us),
            ));
        }
        let m = &self.memory;
        for (field, v) in
            [("total_bytes", m.total_bytes), ("usable_bytes", m.usable_bytes), ("max_alloc_bytes", m.max_alloc_bytes)]
        {
            if v == 0 {
                return Err(FieldError::new(format!("memory.{field}"), "must be positive"));
            }
        }
        if m.usable_bytes > m.total_bytes {
            return Err(FieldError::new(
                "memory.usable_bytes",
                format!("{} exceeds total_bytes {}", m.usable_bytes, m.total_bytes),
            ));
        }
        if m.max_alloc_bytes > m.usable_bytes {
            return Err(FieldError::new(
                "memory.max_alloc_bytes",
                format!("{} exceeds usable_bytes {}", m.max_alloc_bytes, m.usable_bytes),
            ));
        }
        if let Some(peak) = &self.peak {
            positive("peak.bandwidth_gbps", peak.bandwidth_gbps)?;
            for (dt, v) in &peak.tflops {
                positive(&format!("peak.tflops.{dt}"), *v)?;
            }
        }
        if let Some(e) = &self.elementwise {
            e.validate()?;
        }
        positive("bandwidth.read_gbps", self.bandwidth.read_gbps)?;
        positive("bandwidth.copy_gbps", self.bandwidth.copy_gbps)?;
        for (dt, v) in &self.bandwidth.gemv_gbps {
            positive(&format!("bandwidth.gemv_gbps.{dt}"), *v)?;
        }
        for (section, curves) in [("gemm", &self.gemm), ("attention", &self.attention)] {
            if curves.is_empty() {
                return Err(FieldError::new(section, "needs a curve for at least one dtype"));
            }
            for (dt, c) in curves {
                c.validate().map_err(|e| e.within(&format!("{section}.{dt}")))?;
            }
        }
        for (f, q) in &self.quantized {
            if !f.is_block() {
                return Err(FieldError::new(
                    format!("quantized.{f}"),
                    "rates are per block format (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k .. q6_k), not dense or a mix",
                ));
            }
            q.validate().map_err(|e| e.within(&format!("quantized.{f}")))?;
        }
        Ok(())
    }

    /// Dispatch overhead in seconds.
    pub fn dispatch_s(&self) -> f64 {
        self.dispatch_overhead_us * 1e-6
    }
}

/// A link between two kinds of machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkProfile {
    pub name: String,
    /// The two machine names it joins; `"*"` matches any machine.
    #[serde(deserialize_with = "exactly_two")]
    pub between: [String; 2],
    /// Sustained bandwidth for point-to-point tensor transfers, GB/s.
    pub bandwidth_gbps: f64,
    /// One-way latency of a message, microseconds.
    pub latency_us: f64,
}

/// `between` as written: a list of exactly two names (serde alone would let a third
/// through unnoticed in some formats, and its own message does not say what is allowed).
fn exactly_two<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[String; 2], D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    let n = names.len();
    <[String; 2]>::try_from(names)
        .map_err(|_| serde::de::Error::custom(format!("`between` must name exactly two machines (or \"*\"), got {n}")))
}

impl LinkProfile {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.name.trim().is_empty() {
            return Err(FieldError::new("name", "must not be empty"));
        }
        for (i, b) in self.between.iter().enumerate() {
            if b.trim().is_empty() {
                return Err(FieldError::new(format!("between[{i}]"), "must name a machine or \"*\""));
            }
        }
        positive("bandwidth_gbps", self.bandwidth_gbps)?;
        if !self.latency_us.is_finite() || self.latency_us < 0.0 {
            return Err(FieldError::new(
                "latency_us",
                format!("must be finite and non-negative, got {}", self.latency_us),
            ));
        }
        Ok(())
    }

    /// Seconds to move `bytes` across this link in one message.
    pub fn transfer_s(&self, bytes: u64) -> f64 {
        self.latency_us * 1e-6 + bytes as f64 / (self.bandwidth_gbps * 1e9)
    }

    /// How specifically this link matches the pair `(a, b)`: 2 for both names, 1 for one
    /// name and a wildcard, 0 for two wildcards; `None` if it does not match.
    pub fn matches(&self, a: &str, b: &str) -> Option<u8> {
        let fits = |pat: &str, name: &str| pat == "*" || pat == name;
        let exact = |pat: &str| u8::from(pat != "*");
        let [x, y] = &self.between;
        if (fits(x, a) && fits(y, b)) || (fits(x, b) && fits(y, a)) {
            Some(exact(x) + exact(y))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(size: &[f64], tflops: &[f64]) -> Curve {
        Curve { size: size.to_vec(), tflops: tflops.to_vec() }
    }

    #[test]
    fn curve_interpolates_log_log_and_clamps() {
        let c = curve(&[512.0, 2048.0], &[1.0, 4.0]);
        // Halfway in log space: sqrt(512 * 2048) = 1024 -> sqrt(1 * 4) = 2.
        assert!((c.at(1024.0) - 2.0).abs() < 1e-12);
        assert_eq!(c.at(1.0), 1.0);
        assert_eq!(c.at(1e9), 4.0);
        assert_eq!(c.at(512.0), 1.0);
        assert_eq!(c.at(2048.0), 4.0);
    }

    #[test]
    fn curve_validation_names_the_point() {
        assert_eq!(curve(&[], &[]).validate().unwrap_err().field, "size");
        assert_eq!(curve(&[1.0, 2.0], &[1.0]).validate().unwrap_err().field, "tflops");
        assert_eq!(curve(&[2.0, 1.0], &[1.0, 1.0]).validate().unwrap_err().field, "size[1]");
        assert_eq!(curve(&[1.0, 2.0], &[1.0, f64::NAN]).validate().unwrap_err().field, "tflops[1]");
        assert_eq!(curve(&[1.0, 2.0], &[1.0, -3.0]).validate().unwrap_err().field, "tflops[1]");
    }

    #[test]
    fn links_match_most_specific_first() {
        let l = |a: &str, b: &str| LinkProfile {
            name: "l".into(),
            between: [a.into(), b.into()],
            bandwidth_gbps: 1.0,
            latency_us: 0.0,
        };
        assert_eq!(l("m4", "m5").matches("m5", "m4"), Some(2));
        assert_eq!(l("*", "m5").matches("m5", "m4"), Some(1));
        assert_eq!(l("*", "*").matches("a", "b"), Some(0));
        assert_eq!(l("m4", "m4").matches("m4", "m5"), None);
        // 1 GB at 1 GB/s plus no latency is one second.
        assert!((l("*", "*").transfer_s(1_000_000_000) - 1.0).abs() < 1e-12);
    }
}
