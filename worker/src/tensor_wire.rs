//! Converting candle tensors to and from the wire's raw little-endian bytes.

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use lemur_protocol::wire::{TensorMeta, WireDType};

use crate::error::WorkerError;

/// The wire dtype of a candle dtype, if it can travel.
pub fn wire_dtype(dt: DType) -> Result<WireDType, WorkerError> {
    Ok(match dt {
        DType::F32 => WireDType::F32,
        DType::F16 => WireDType::F16,
        DType::BF16 => WireDType::Bf16,
        DType::U32 => WireDType::U32,
        other => return Err(WorkerError::Wire(format!("tensors of {other:?} do not travel"))),
    })
}

pub fn candle_dtype(dt: WireDType) -> DType {
    match dt {
        WireDType::F32 => DType::F32,
        WireDType::F16 => DType::F16,
        WireDType::Bf16 => DType::BF16,
        WireDType::U32 => DType::U32,
    }
}

/// A tensor's metadata and raw bytes (copied once out of the device).
pub fn to_wire(t: &Tensor) -> Result<(TensorMeta, Bytes), WorkerError> {
    let flat = t.flatten_all()?;
    let bytes: Vec<u8> = match t.dtype() {
        DType::F32 => bytemuck::cast_slice(&flat.to_vec1::<f32>()?).to_vec(),
        DType::F16 => bytemuck::cast_slice(&flat.to_vec1::<half::f16>()?).to_vec(),
        DType::BF16 => bytemuck::cast_slice(&flat.to_vec1::<half::bf16>()?).to_vec(),
        DType::U32 => bytemuck::cast_slice(&flat.to_vec1::<u32>()?).to_vec(),
        other => return Err(WorkerError::Wire(format!("tensors of {other:?} do not travel"))),
    };
    Ok((TensorMeta { dtype: wire_dtype(t.dtype())?, shape: t.dims().to_vec() }, Bytes::from(bytes)))
}

/// A candle tensor from wire bytes (already checked against the shape by the decoder).
pub fn from_wire(meta: &TensorMeta, data: &[u8], device: &Device) -> Result<Tensor, WorkerError> {
    Ok(Tensor::from_raw_buffer(data, candle_dtype(meta.dtype), &meta.shape, device)?)
}
