//! Device selection: one API, backends behind cargo features (`cuda`, `metal`); a backend
//! that was not built is a clear error, not a missing symbol.

use candle_core::Device;

use crate::error::WorkerError;

/// Opens the device named `cpu`, `cuda` (optionally `cuda:N`) or `metal`.
pub fn open(name: &str) -> Result<Device, WorkerError> {
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, n)) => {
            (k, n.parse::<usize>().map_err(|_| WorkerError::Device(format!("bad device ordinal in `{name}`")))?)
        }
        None => (name, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if cfg!(feature = "cuda") {
                let dev = Device::new_cuda(ordinal).map_err(|e| WorkerError::Device(format!("cuda:{ordinal}: {e}")))?;
                single_stream(&dev);
                Ok(dev)
            } else {
                Err(WorkerError::Device(
                    "this lemur-worker was built without CUDA (rebuild with --features cuda)".into(),
                ))
            }
        }
        "metal" => {
            if cfg!(feature = "metal") {
                Device::new_metal(ordinal).map_err(|e| WorkerError::Device(format!("metal:{ordinal}: {e}")))
            } else {
                Err(WorkerError::Device(
                    "this lemur-worker was built without Metal (rebuild with --features metal)".into(),
                ))
            }
        }
        other => Err(WorkerError::Device(format!("unknown device `{other}`: use cpu, cuda or metal"))),
    }
}

/// A worker runs every kernel of a device on candle's one stream, so the CUDA events
/// candle records on every tensor use (to order work across streams) only cost time: about
/// a microsecond or two of host work per kernel, which is what a decode step is made of.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn single_stream(dev: &Device) {
    if let Device::Cuda(d) = dev {
        // SAFETY: tensors are created and used on the device's single stream only; nothing
        // in the worker uses a second stream.
        unsafe { d.disable_event_tracking() };
    }
}

#[cfg(not(feature = "cuda"))]
fn single_stream(_dev: &Device) {}
