//! Converting candle tensors to and from the wire's raw little-endian bytes.

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use lemur_protocol::wire::{TensorMeta, WireDType, WireTensor};

use crate::error::WorkerError;

/// The wire dtype of a candle dtype, if it can travel.
pub fn wire_dtype(dt: DType) -> Result<WireDType, WorkerError> {
    Ok(match dt {
        DType::F32 => WireDType::F32,
        DType::F16 => WireDType::F16,
        DType::BF16 => WireDType::Bf16,
        DType::U32 => WireDType::U32,
        DType::U8 => WireDType::U8,
        other => return Err(WorkerError::Wire(format!("tensors of {other:?} do not travel"))),
    })
}

pub fn candle_dtype(dt: WireDType) -> DType {
    match dt {
        WireDType::F32 => DType::F32,
        WireDType::F16 => DType::F16,
        WireDType::Bf16 => DType::BF16,
        WireDType::U32 => DType::U32,
        WireDType::U8 => DType::U8,
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
        DType::U8 => flat.to_vec1::<u8>()?,
        other => return Err(WorkerError::Wire(format!("tensors of {other:?} do not travel"))),
    };
    Ok((TensorMeta { dtype: wire_dtype(t.dtype())?, shape: t.dims().to_vec() }, Bytes::from(bytes)))
}

/// A candle tensor from wire bytes (already checked against the shape by the decoder).
pub fn from_wire(meta: &TensorMeta, data: &[u8], device: &Device) -> Result<Tensor, WorkerError> {
    Ok(Tensor::from_raw_buffer(data, candle_dtype(meta.dtype), &meta.shape, device)?)
}

/// Several tensors as a message's metadata list and the frame's data, in order.
pub fn to_wire_all<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Result<(Vec<TensorMeta>, Vec<Bytes>), WorkerError> {
    let mut metas = Vec::new();
    let mut datas = Vec::new();
    for t in ts {
        let (m, d) = to_wire(t)?;
        metas.push(m);
        datas.push(d);
    }
    Ok((metas, datas))
}

/// Wire tensors as candle tensors on `device`.
pub fn from_wire_all(ts: &[WireTensor], device: &Device) -> Result<Vec<Tensor>, WorkerError> {
    ts.iter().map(|t| from_wire(&t.meta, &t.data, device)).collect()
}

/// Token ids as a (1, n) u32 wire tensor.
pub fn ids_to_wire(rows: &[&[u32]]) -> WireTensor {
    let width = rows.first().map_or(0, |r| r.len());
    let data: Vec<u8> = rows.iter().flat_map(|r| r.iter()).flat_map(|t| t.to_le_bytes()).collect();
    WireTensor { meta: TensorMeta { dtype: WireDType::U32, shape: vec![rows.len(), width] }, data: Bytes::from(data) }
}

/// An f32 wire tensor's values (little-endian), or an error naming what it is instead.
pub fn f32_values(t: &WireTensor) -> Result<Vec<f32>, WorkerError> {
    if t.meta.dtype != WireDType::F32 {
        return Err(WorkerError::Wire(format!("expected f32 values, got {:?}", t.meta.dtype)));
    }
    Ok(t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// f32 values with their shape as a wire tensor.
pub fn f32_to_wire(shape: &[usize], values: &[f32]) -> WireTensor {
    let data: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    WireTensor { meta: TensorMeta { dtype: WireDType::F32, shape: shape.to_vec() }, data: Bytes::from(data) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_through_wire_bytes() {
        let t = Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 4.0, -0.5]], &Device::Cpu).unwrap();
        let (metas, datas) = to_wire_all([&t, &t]).unwrap();
        let wire: Vec<WireTensor> =
            metas.into_iter().zip(datas).map(|(meta, data)| WireTensor { meta, data }).collect();
        let back = from_wire_all(&wire, &Device::Cpu).unwrap();
        assert_eq!(back[1].to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        assert_eq!(f32_values(&wire[0]).unwrap(), vec![1.5, -2.0, 3.25, 0.0, 4.0, -0.5]);
        let ids = ids_to_wire(&[&[1, 2, 3], &[4, 5, 6]]);
        assert_eq!(ids.meta.shape, vec![2, 3]);
        assert!(f32_values(&ids).is_err());
        let back = from_wire(&ids.meta, &ids.data, &Device::Cpu).unwrap();
        assert_eq!(back.to_vec2::<u32>().unwrap(), vec![vec![1, 2, 3], vec![4, 5, 6]]);
        let v = f32_to_wire(&[2], &[0.5, 1.0]);
        assert_eq!(f32_values(&v).unwrap(), vec![0.5, 1.0]);
    }
}
