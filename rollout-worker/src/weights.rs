//! Assembly of a weight update from streamed chunks, and its application to the model.
//!
//! Data flow: the gRPC `UpdateWeights` handler feeds every [`TensorChunk`] to a
//! [`WeightAssembler`], which checks it against the architecture's parameter list
//! (`model::param_specs`: name, shape) and copies its bytes straight into that tensor's
//! host buffer (a [`Tensor`] in the chunks' dtype allocated at its first chunk: the one
//! copy between the network buffer and the tensor). A tensor's chunks arrive in order.
//! [`WeightAssembler::finish`]
//! requires every parameter and yields [`StagedWeights`], which the engine thread applies
//! with [`apply`] between two decode steps, so the model is never seen half-updated: a
//! parameter whose staging tensor has its dtype and device takes over that storage (a
//! swap, no copy; its old storage becomes the next update's staging), any other is
//! converted into place by one `copy_`.
//!
//! Extra memory is bounded by one copy of the model in the wire dtype on the host: one
//! buffer per known parameter of exactly its size, nothing for unknown names, and the
//! whole staging dropped on the first error, leaving the serving weights untouched.
use std::collections::HashMap;

use bytes::Bytes;
use model::{ParamSpec, Weights};
use tch::{Device, Kind, Tensor};

/// Element type of chunk bytes (little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDType {
    F32,
    BF16,
    F16,
}

impl WireDType {
    pub fn kind(self) -> Kind {
        match self {
            WireDType::F32 => Kind::Float,
            WireDType::BF16 => Kind::BFloat16,
            WireDType::F16 => Kind::Half,
        }
    }

    pub fn size(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::BF16 | WireDType::F16 => 2,
        }
    }

    pub fn from_kind(kind: Kind) -> Option<Self> {
        match kind {
            Kind::Float => Some(WireDType::F32),
            Kind::BFloat16 => Some(WireDType::BF16),
            Kind::Half => Some(WireDType::F16),
            _ => None,
        }
    }
}

/// A byte range of one named tensor (the domain form of `rollout.v1.TensorChunk`).
#[derive(Debug, Clone)]
pub struct TensorChunk {
    pub name: String,
    /// `None` when the sender left it unspecified (an error).
    pub dtype: Option<WireDType>,
    pub shape: Vec<i64>,
    pub offset: u64,
    pub data: Bytes,
}

/// Why an update was rejected. Every variant names the tensor at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightError {
    #[error("chunk for unknown tensor {name:?} (not a parameter of this architecture)")]
    UnknownTensor { name: String },
    #[error("tensor {name}: shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("tensor {name}: malformed chunk: {message}")]
    Malformed { name: String, message: String },
    /// No memory for the tensor's staging (host or device out of memory).
    #[error("tensor {name}: allocating {bytes} bytes of staging: {message}")]
    Alloc {
        name: String,
        bytes: u64,
        message: String,
    },
    #[error("update incomplete: {count} tensor(s) missing or partial, e.g. {names:?}")]
    Incomplete { count: usize, names: Vec<String> },
}

/// A tensor being filled: `filled` of its `total` bytes have arrived.
struct Partial {
    dtype: WireDType,
    total: usize,
    filled: usize,
    tensor: Tensor,
}

/// Copies `data` into the bytes `offset..offset + data.len()` of `t`, a contiguous CPU
/// tensor of at least that many bytes that nothing else references.
fn write_bytes(t: &Tensor, offset: usize, data: &[u8]) {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    assert!(offset + data.len() <= len, "write within the tensor");
    // SAFETY: `t` is a freshly allocated, contiguous CPU tensor owned by the assembler
    // (never shared before it is complete), and the range was checked above.
    unsafe {
        let dst = (t.data_ptr() as *mut u8).add(offset);
        std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
    }
}

/// Collects the chunks of one update.
pub struct WeightAssembler {
    specs: HashMap<String, Vec<i64>>,
    order: Vec<String>,
    partial: HashMap<String, Partial>,
    done: HashMap<String, Tensor>,
    num_bytes: u64,
}

/// A complete, validated update, held on the host until the engine applies it.
pub struct StagedWeights {
    /// `(name, tensor)` in parameter order, in the wire dtype, on the CPU.
    pub tensors: Vec<(String, Tensor)>,
    pub num_bytes: u64,
    /// Takes the tensors back once the update is applied or dropped (the data plane keeps
    /// them as the next update's staging, already faulted in).
    pub recycle: Option<Recycle>,
}

/// Receives the staging tensors of a `StagedWeights` when it is dropped.
pub type Recycle = Box<dyn FnOnce(Vec<(String, Tensor)>) + Send>;

impl std::fmt::Debug for StagedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedWeights")
            .field("tensors", &self.tensors.len())
            .field("num_bytes", &self.num_bytes)
            .finish()
    }
}

impl Drop for StagedWeights {
    fn drop(&mut self) {
        if let Some(r) = self.recycle.take() {
            r(std::mem::take(&mut self.tensors));
        }
    }
}

impl WeightAssembler {
    /// An assembler for the parameters `specs` (from `model::param_specs`).
    pub fn new(specs: &[ParamSpec]) -> Self {
        WeightAssembler {
            specs: specs
                .iter()
                .map(|s| (s.name.clone(), s.shape.clone()))
                .collect(),
            order: specs.iter().map(|s| s.name.clone()).collect(),
            partial: HashMap::new(),
            done: HashMap::new(),
            num_bytes: 0,
        }
    }

    /// Bytes received so far.
    pub fn num_bytes(&self) -> u64 {
        self.num_bytes
    }

    /// Validates `chunk` and appends its bytes to its tensor.
    pub fn add_chunk(&mut self, chunk: TensorChunk) -> Result<(), WeightError> {
        let name = chunk.name;
        let malformed = |message: String| WeightError::Malformed {
            name: name.clone(),
            message,
        };
        let Some(expected) = self.specs.get(&name) else {
            return Err(WeightError::UnknownTensor { name });
        };
        if chunk.shape != *expected {
            return Err(WeightError::ShapeMismatch {
                expected: expected.clone(),
                found: chunk.shape,
                name,
            });
        }
        let Some(dtype) = chunk.dtype else {
            return Err(malformed("dtype is unspecified".into()));
        };
        if self.done.contains_key(&name) {
            return Err(malformed("chunk after the tensor was complete".into()));
        }
        let numel: i64 = expected.iter().product();
        let total = numel as usize * dtype.size();
        if !self.partial.contains_key(&name) {
            let tensor = Tensor::f_empty(expected.as_slice(), (dtype.kind(), Device::Cpu))
                .map_err(|e| WeightError::Alloc {
                    name: name.clone(),
                    bytes: total as u64,
                    message: e.to_string(),
                })?;
            self.partial.insert(
                name.clone(),
                Partial {
                    dtype,
                    total,
                    filled: 0,
                    tensor,
                },
            );
        }
        let p = self.partial.get_mut(&name).expect("inserted above");
        if p.dtype != dtype {
            return Err(malformed(format!(
                "dtype {dtype:?} differs from its earlier chunks' {:?}",
                p.dtype
            )));
        }
        if chunk.offset != p.filled as u64 {
            return Err(malformed(format!(
                "offset {} but {} bytes were received so far (chunks must arrive in order)",
                chunk.offset, p.filled
            )));
        }
        if chunk.data.is_empty() && p.total > 0 {
            return Err(malformed("empty data".into()));
        }
        let end = p.filled + chunk.data.len();
        if end > p.total {
            return Err(malformed(format!(
                "bytes up to {end} exceed the tensor's {} ({numel} x {} bytes)",
                p.total,
                dtype.size()
            )));
        }
        write_bytes(&p.tensor, p.filled, &chunk.data);
        p.filled = end;
        self.num_bytes += chunk.data.len() as u64;
        if end == p.total {
            let p = self.partial.remove(&name).expect("present above");
            self.done.insert(name, p.tensor);
        }
        Ok(())
    }

    /// Allocates the staging tensor for a whole tensor sent at once (the data plane):
    /// checks the name, shape, dtype and byte length against the architecture and that
    /// the name was not staged before, and returns a tensor the caller fills with exactly
    /// `num_bytes` bytes (the staging is dropped whole if it fails to).
    pub fn stage(
        &mut self,
        name: &str,
        dtype: Option<WireDType>,
        shape: &[i64],
        num_bytes: u64,
    ) -> Result<Tensor, WeightError> {
        self.stage_reusing(name, dtype, shape, num_bytes, None, Device::Cpu)
    }

    /// [`stage`](Self::stage) on `device`: returns `spare` (a staging tensor of an
    /// earlier update that nothing else references, the engine's serving weights least
    /// of all) when its dtype, shape and device match and it is contiguous, else a fresh
    /// allocation on `device`. Nothing is allocated for a request that fails the checks.
    pub fn stage_reusing(
        &mut self,
        name: &str,
        dtype: Option<WireDType>,
        shape: &[i64],
        num_bytes: u64,
        spare: Option<Tensor>,
        device: Device,
    ) -> Result<Tensor, WeightError> {
        let malformed = |message: String| WeightError::Malformed {
            name: name.to_string(),
            message,
        };
        let Some(expected) = self.specs.get(name) else {
            return Err(WeightError::UnknownTensor { name: name.into() });
        };
        if shape != expected.as_slice() {
            return Err(WeightError::ShapeMismatch {
                name: name.into(),
                expected: expected.clone(),
                found: shape.to_vec(),
            });
        }
        let Some(dtype) = dtype else {
            return Err(malformed("dtype is unspecified or unknown".into()));
        };
        if self.done.contains_key(name) || self.partial.contains_key(name) {
            return Err(malformed("sent twice in one update".into()));
        }
        let numel: i64 = expected.iter().product();
        let total = numel as u64 * dtype.size() as u64;
        if num_bytes != total {
            return Err(malformed(format!(
                "{num_bytes} bytes announced, the tensor has {total} ({numel} x {} bytes)",
                dtype.size()
            )));
        }
        let fits = |t: &Tensor| {
            t.kind() == dtype.kind()
                && t.size() == *expected
                && t.device() == device
                && t.is_contiguous()
        };
        let tensor = match spare {
            Some(t) if fits(&t) => t,
            _ => Tensor::f_empty(expected.as_slice(), (dtype.kind(), device)).map_err(|e| {
                WeightError::Alloc {
                    name: name.into(),
                    bytes: total,
                    message: e.to_string(),
                }
            })?,
        };
        self.done.insert(name.to_string(), tensor.shallow_clone());
        self.num_bytes += total;
        Ok(tensor)
    }

    /// The complete update; an error lists what is missing.
    pub fn finish(mut self) -> Result<StagedWeights, WeightError> {
        let missing: Vec<&String> = self
            .order
            .iter()
            .filter(|n| !self.done.contains_key(*n))
            .collect();
        if !missing.is_empty() {
            return Err(WeightError::Incomplete {
                count: missing.len(),
                names: missing.iter().take(4).map(|s| s.to_string()).collect(),
            });
        }
        let tensors = self
            .order
            .iter()
            .map(|n| (n.clone(), self.done.remove(n).expect("checked complete")))
            .collect();
        Ok(StagedWeights {
            tensors,
            num_bytes: self.num_bytes,
            recycle: None,
        })
    }
}

/// How an update reached the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Parameters that took over their staging tensor's storage (no copy).
    pub swapped: usize,
    /// Parameters converted into the live tensor in place (`copy_`).
    pub copied: usize,
}

/// True when `live` can take over `staged`'s storage as is: same dtype, device and
/// shape, both contiguous, and `live` outside autograd.
fn swappable(live: &Tensor, staged: &Tensor) -> bool {
    live.kind() == staged.kind()
        && live.device() == staged.device()
        && live.size() == staged.size()
        && live.is_contiguous()
        && staged.is_contiguous()
        && !live.requires_grad()
}

/// Makes `staged` the serving weights of `weights`; the engine calls it between two
/// decode steps with no group started, so no forward ever sees a half-updated model.
///
/// Where a staging tensor already is what the live parameter holds (same dtype, device
/// and layout: an f32 wire to an f32 CPU model, bf16 to bf16), the live parameter takes
/// over the staging storage (`set_data`, no copy) and its old storage takes the staging
/// tensor's place in `staged`, so dropping `staged` recycles it as the next update's
/// staging: no allocation and no copy per update. `set_data` changes the parameter's
/// own `TensorImpl`, which every holder of the parameter shares: a tied head
/// ([`Weights::head`] is `embed_tokens` itself) stays tied, and the model keeps no
/// derived copy of its weights (no fused or transposed cache) that could go stale.
/// Elsewhere (a bf16 wire to an f32 model, a GPU model) one in-place `copy_` converts the
/// staged bytes into the live tensor. Names and shapes were validated against the same
/// architecture, so neither can fail on shapes; a torch error (device out of memory) is
/// returned.
pub fn apply(weights: &Weights, staged: &mut StagedWeights) -> Result<Applied, tch::TchError> {
    let _guard = tch::no_grad_guard();
    let mut by_name: HashMap<String, &Tensor> = weights.named().into_iter().collect();
    let mut out = Applied::default();
    for (name, src) in staged.tensors.iter_mut() {
        let dst = by_name.remove(name.as_str()).ok_or_else(|| {
            tch::TchError::Shape(format!("{name} is not a parameter of the serving model"))
        })?;
        if swappable(dst, src) {
            // `detach` is a second handle on the old storage; the shallow clone shares
            // the parameter's `TensorImpl`, so `set_data` lands in the model.
            let old = dst.f_detach()?;
            dst.shallow_clone().f_set_data(src)?;
            *src = old;
            out.swapped += 1;
        } else {
            dst.shallow_clone().f_copy_(src)?;
            out.copied += 1;
        }
    }
    Ok(out)
}

/// Splits `weights` into chunks of at most `chunk_bytes`, as a sender does (used by
/// tests and the benchmark; the trainer has its own sender).
pub fn chunks_of(weights: &Weights, dtype: WireDType, chunk_bytes: usize) -> Vec<TensorChunk> {
    let mut out = vec![];
    for (name, t) in weights.named() {
        let host = t.to_device(Device::Cpu).to_kind(dtype.kind()).contiguous();
        let mut bytes = vec![0u8; host.numel() * dtype.size()];
        host.copy_data_u8(&mut bytes, host.numel());
        for (i, part) in bytes.chunks(chunk_bytes.max(1)).enumerate() {
            out.push(TensorChunk {
                name: name.clone(),
                dtype: Some(dtype),
                shape: t.size(),
                offset: (i * chunk_bytes.max(1)) as u64,
                data: Bytes::copy_from_slice(part),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "a".into(),
                shape: vec![2, 3],
            },
            ParamSpec {
                name: "b".into(),
                shape: vec![4],
            },
        ]
    }

    fn chunk(name: &str, shape: &[i64], offset: u64, values: &[f32]) -> TensorChunk {
        TensorChunk {
            name: name.into(),
            dtype: Some(WireDType::F32),
            shape: shape.to_vec(),
            offset,
            data: values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        }
    }

    #[test]
    fn interleaved_chunks_assemble_in_parameter_order() {
        let mut a = WeightAssembler::new(&specs());
        a.add_chunk(chunk("b", &[4], 0, &[1.0, 2.0])).unwrap();
        a.add_chunk(chunk("a", &[2, 3], 0, &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
            .unwrap();
        a.add_chunk(chunk("b", &[4], 8, &[3.0, 4.0])).unwrap();
        assert_eq!(a.num_bytes(), 40);
        let s = a.finish().unwrap();
        assert_eq!(s.tensors[0].0, "a");
        assert_eq!(s.tensors[0].1.size(), vec![2, 3]);
        let b = Vec::<f32>::try_from(&s.tensors[1].1).unwrap();
        assert_eq!(b, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn bad_chunks_are_rejected_with_the_tensor_named() {
        let mut a = WeightAssembler::new(&specs());
        let e = a.add_chunk(chunk("c", &[4], 0, &[1.0])).unwrap_err();
        assert!(matches!(e, WeightError::UnknownTensor { .. }), "{e}");
        let e = a.add_chunk(chunk("b", &[5], 0, &[1.0])).unwrap_err();
        assert!(
            e.to_string().contains("[5]") && e.to_string().contains("[4]"),
            "{e}"
        );
        let e = a.add_chunk(chunk("b", &[4], 4, &[1.0])).unwrap_err();
        assert!(e.to_string().contains("offset 4"), "{e}");
        let e = a
            .add_chunk(chunk("b", &[4], 0, &[1.0, 2.0, 3.0, 4.0, 5.0]))
            .unwrap_err();
        assert!(e.to_string().contains("exceed"), "{e}");
        let mut c = chunk("b", &[4], 0, &[1.0]);
        c.dtype = None;
        assert!(a.add_chunk(c).unwrap_err().to_string().contains("dtype"));
        a.add_chunk(chunk("b", &[4], 0, &[1.0, 2.0, 3.0, 4.0]))
            .unwrap();
        let e = a.add_chunk(chunk("b", &[4], 16, &[1.0])).unwrap_err();
        assert!(e.to_string().contains("complete"), "{e}");
        let e = a.finish().unwrap_err();
        assert_eq!(
            e,
            WeightError::Incomplete {
                count: 1,
                names: vec!["a".into()]
            }
        );
    }

    #[test]
    fn bf16_chunks_keep_their_dtype() {
        let mut a = WeightAssembler::new(&specs()[1..]);
        let t = Tensor::from_slice(&[1.5f32, -2.0, 0.25, 8.0]).to_kind(Kind::BFloat16);
        let mut bytes = vec![0u8; 8];
        t.copy_data_u8(&mut bytes, 4);
        a.add_chunk(TensorChunk {
            name: "b".into(),
            dtype: Some(WireDType::BF16),
            shape: vec![4],
            offset: 0,
            data: bytes.into(),
        })
        .unwrap();
        let s = a.finish().unwrap();
        assert_eq!(s.tensors[0].1.kind(), Kind::BFloat16);
        let v = Vec::<f32>::try_from(s.tensors[0].1.to_kind(Kind::Float)).unwrap();
        assert_eq!(v, vec![1.5, -2.0, 0.25, 8.0]);
    }
}
