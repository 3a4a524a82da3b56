//! The cost model: predicted seconds for every op on every machine, and for every transfer on a link.
//!
//! [`Roofline`] prices each [`Kernel`] of an op separately and adds them up:
//! - GEMMs run at the measured square-GEMM rate of the problem with the same work
//!   (`N = cbrt(m n k)`, log-log interpolated), or at memory speed if streaming the
//!   operands takes longer (decode's matrix-vector products); a GEMM on weights in a block
//!   format takes the machine's rates for that format (`[quantized.q4_k]`: its GEMM curve
//!   and matrix-vector rate), and the dense rates of its dtype where the profile has none
//!   ([`gemm_rates`] says which, for the plan's report);
//! - attention runs at the measured attention rate for its key length, or at memory speed
//!   for the KV cache, whichever is slower;
//! - element-wise work moves its bytes at the measured copy bandwidth, times the extra
//!   passes and launches the machine's [`KernelStyle`] implies (eager PyTorch runs RMSNorm
//!   as eight kernels in f32; a fused kernel reads and writes once);
//! - every kernel pays the machine's dispatch overhead once.

use lemur_protocol::{DType, KernelStyle, LinkProfile, MachineProfile, WeightFormat};

use crate::graph::{EwClass, Kernel, Op};

/// A kernel that a profile cannot price.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CostError {
    #[error("machine `{machine}` has no {table} curve for {dtype}; its profile must measure it to run {dtype} work")]
    MissingCurve { machine: String, table: &'static str, dtype: DType },
}

/// Predicts how long ops and transfers take.
pub trait CostModel {
    /// Seconds for one kernel on `machine`.
    fn kernel_seconds(&self, kernel: &Kernel, machine: &MachineProfile) -> Result<f64, CostError>;

    /// Seconds for a whole op: its kernels one after another.
    fn op_seconds(&self, op: &Op, machine: &MachineProfile) -> Result<f64, CostError> {
        op.kernels.iter().map(|k| self.kernel_seconds(k, machine)).sum()
    }

    /// Seconds to move `bytes` over `link` in one message.
    fn transfer_seconds(&self, bytes: u64, link: &LinkProfile) -> f64 {
        link.transfer_s(bytes)
    }
}

/// The roofline cost model driven by measured curves (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Roofline;

/// Launches and traffic (as a multiple of the minimal fused traffic) of an element-wise
/// kernel family under a kernel style.
///
/// Eager figures follow what PyTorch runs for Hugging Face's Mistral in float16:
/// - RMSNorm: `to(f32)`, `pow`, `mean`, `add`, `rsqrt`, `mul`, `to(f16)`, `mul(weight)`:
///   8 launches and 36 bytes per element against 4 fused (9x); autograd of that chain
///   about twice the forward's traffic against a fused backward's 6 bytes (12x, 14 launches).
/// - RoPE: `q*cos`, `rotate_half` (slice, neg, cat), `*sin`, `add`, for q and for k:
///   10 launches and about 22 bytes per element against 4 (5.5x).
/// - SiLU-multiply: `silu` then `mul`: 2 launches, 10 bytes against 6 (1.67x); backward 5, 2x.
/// - Cross-entropy: upcast, log-softmax, gather: 3 launches, 3x.
///
/// Fused figures follow candle: fused RMSNorm and RoPE forward, `silu` and `mul` apart. The
/// workers' training backward is hand-written (`lemur_worker::backward`); a profile measured
/// by `lemur-profile` carries its element-wise rates, which win over this table.
pub fn elementwise_factor(class: EwClass, backward: bool, style: KernelStyle) -> (u32, f64) {
    use EwClass::*;
    match (class, backward, style) {
        (Gather, _, _) => (1, 1.0),
        (RmsNorm, false, KernelStyle::Eager) => (8, 9.0),
        (RmsNorm, false, KernelStyle::Fused) => (1, 1.0),
        (RmsNorm, true, _) => (14, 12.0),
        (Rope, false, KernelStyle::Eager) => (10, 5.5),
        (Rope, false, KernelStyle::Fused) => (2, 1.0),
        (Rope, true, _) => (10, 5.5),
        (SiluMul, false, _) => (2, 10.0 / 6.0),
        (SiluMul, true, _) => (5, 2.0),
        (Add, false, _) => (1, 1.0),
        // Where the residual stream branches, autograd sums the two incoming gradients.
        (Add, true, _) => (1, 1.5),
        (RepeatKv, _, _) => (1, 1.0),
        (CrossEntropy, false, KernelStyle::Eager) => (3, 3.0),
        (CrossEntropy, false, KernelStyle::Fused) => (2, 2.0),
        (CrossEntropy, true, _) => (3, 2.0),
        (SoftmaxBackward, _, _) => (2, 1.0),
        (Dequantize(_), _, _) => (1, 1.0),
    }
}

/// Where a GEMM's rates came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateSource {
    /// Dense weights: the dtype's GEMM curve and matrix-vector (or read) rate.
    Dense,
    /// The profile's rates for the weights' block format (`estimate`: derived, not measured).
    Quantized { estimate: bool },
    /// A block format the profile has no rates for: priced at the dtype's dense rates.
    Unpriced,
}

/// The rates that price one GEMM on a machine: FLOP/s at its size and bytes/s when memory-bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmRates {
    pub flops_per_s: f64,
    pub stream_bytes_per_s: f64,
    pub source: RateSource,
}

/// The rates for a GEMM of equivalent size `size` (`cbrt(m n k)`) in `dtype` whose weight
/// is stored as `quant` (see the module docs).
pub fn gemm_rates(
    machine: &MachineProfile,
    dtype: DType,
    quant: Option<WeightFormat>,
    size: f64,
) -> Result<GemmRates, CostError> {
    if let Some(q) = quant.and_then(|f| machine.quantized.get(&f)) {
        return Ok(GemmRates {
            flops_per_s: q.gemm.at(size) * 1e12,
            stream_bytes_per_s: q.gemv_gbps * 1e9,
            source: RateSource::Quantized { estimate: q.estimate },
        });
    }
    let read_bw = machine.bandwidth.read_gbps * 1e9;
    Ok(GemmRates {
        flops_per_s: curve(machine, "gemm", dtype)?.at(size) * 1e12,
        // A measured matrix-vector rate for the dtype wins over the plain read rate.
        stream_bytes_per_s: machine.bandwidth.gemv_gbps.get(&dtype).map_or(read_bw, |g| g * 1e9),
        source: if quant.is_some() { RateSource::Unpriced } else { RateSource::Dense },
    })
}

fn curve<'a>(
    machine: &'a MachineProfile,
    table: &'static str,
    dtype: DType,
) -> Result<&'a lemur_protocol::Curve, CostError> {
    let map = if table == "gemm" { &machine.gemm } else { &machine.attention };
    map.get(&dtype).ok_or_else(|| CostError::MissingCurve { machine: machine.name.clone(), table, dtype })
}

impl CostModel for Roofline {
    fn kernel_seconds(&self, kernel: &Kernel, machine: &MachineProfile) -> Result<f64, CostError> {
        let dispatch = machine.dispatch_s();
        let read_bw = machine.bandwidth.read_gbps * 1e9;
        let copy_bw = machine.bandwidth.copy_gbps * 1e9;
        let (w, a) = kernel.bytes_read();
        let streamed = (w + a + kernel.bytes_written()) as f64;
        Ok(match *kernel {
            Kernel::Gemm { m, n, k, dtype, quant, .. } => {
                let r = gemm_rates(machine, dtype, quant, ((m * n * k) as f64).cbrt())?;
                dispatch + (kernel.flops() as f64 / r.flops_per_s).max(streamed / r.stream_bytes_per_s)
            }
            Kernel::Attention { kv_len, dtype, .. } => {
                let rate = curve(machine, "attention", dtype)?.at(kv_len as f64) * 1e12;
                dispatch + (kernel.flops() as f64 / rate).max(streamed / read_bw)
            }
            Kernel::Elementwise { class, backward, .. } => {
                // A measured rate for the class (forward kernels) wins over the style table.
                let measured = match (&machine.elementwise, class, backward) {
                    (Some(e), EwClass::RmsNorm, false) => Some(e.rms_norm_gbps),
                    (Some(e), EwClass::RmsNorm, true) => e.rms_norm_backward_gbps,
                    // RoPE's backward is the opposite rotation: the same kernel.
                    (Some(e), EwClass::Rope, _) => Some(e.rope_gbps),
                    (Some(e), EwClass::SiluMul, false) => Some(e.silu_mul_gbps),
                    (Some(e), EwClass::SiluMul, true) => e.silu_mul_backward_gbps,
                    // Forward: the residual add; backward: the sum of a branching gradient.
                    (Some(e), EwClass::Add, _) => Some(e.add_gbps),
                    (Some(e), EwClass::CrossEntropy, false) => e.cross_entropy_gbps,
                    (Some(e), EwClass::CrossEntropy, true) => e.cross_entropy_backward_gbps,
                    // Dequantizing: the format's measured rate of dense bytes written.
                    (_, EwClass::Dequantize(f), _) => match machine.quantized.get(&f).and_then(|q| q.dequantize_gbps) {
                        Some(gbps) => return Ok(dispatch + kernel.bytes_written() as f64 / (gbps * 1e9)),
                        None => None,
                    },
                    _ => None,
                };
                match measured {
                    Some(gbps) => dispatch + streamed / (gbps * 1e9),
                    None => {
                        let (launches, traffic) = elementwise_factor(class, backward, machine.kernel_style);
                        f64::from(launches) * dispatch + streamed * traffic / copy_bw
                    }
                }
            }
        })
    }
}

/// Predicted seconds of every op on every machine: `at(op, machine)`.
#[derive(Debug, Clone)]
pub struct CostTable {
    machines: usize,
    seconds: Vec<f64>,
}

impl CostTable {
    /// Prices every op of `graph` on every machine.
    pub fn new(
        model: &impl CostModel,
        ops: impl Iterator<Item = impl std::ops::Deref<Target = Op>>,
        machines: &[&MachineProfile],
    ) -> Result<Self, CostError> {
        let mut seconds = Vec::new();
        for op in ops {
            for m in machines {
                seconds.push(model.op_seconds(&op, m)?);
            }
        }
        Ok(Self { machines: machines.len(), seconds })
    }

    pub fn at(&self, op: usize, machine: usize) -> f64 {
        self.seconds[op * self.machines + machine]
    }

    pub fn num_machines(&self) -> usize {
        self.machines
    }

    pub fn num_ops(&self) -> usize {
        self.seconds.len() / self.machines.max(1)
    }

    /// The fastest machine for an op and its time there.
    pub fn best(&self, op: usize) -> (usize, f64) {
        (0..self.machines).map(|m| (m, self.at(op, m))).fold((0, f64::INFINITY), |b, x| if x.1 < b.1 { x } else { b })
    }
}
