//! The pieces of one update's tensors (`proto::data_plane`, "piece"): a tensor comes
//! whole or as disjoint byte ranges, possibly over several lanes and in any order. Its
//! first piece stages it (the name, shape, dtype and full length checked against the
//! architecture, once); each piece claims its range, refused when it overlaps one that
//! arrived or runs past the tensor; the update is complete only when every staged
//! tensor got all its bytes.
use std::collections::HashMap;

use proto::data_plane::{self as dp, TensorHeader};
use tch::Tensor;

use super::{stage, wire_dtype, Shared};
use crate::error::EngineError;
use crate::weights::{WeightAssembler, WeightError};

/// The tensors of an update that have some of their pieces but not all.
#[derive(Default)]
pub(super) struct Pieces {
    open: HashMap<String, Open>,
}

struct Open {
    tensor: Tensor,
    dtype: u8,
    shape: Vec<i64>,
    total: u64,
    got: u64,
    /// The ranges claimed so far, sorted and disjoint.
    ranges: Vec<(u64, u64)>,
}

fn malformed(name: &str, message: String) -> EngineError {
    WeightError::Malformed {
        name: name.to_string(),
        message,
    }
    .into()
}

impl Open {
    /// Claims the bytes `offset..offset + len`.
    fn claim(&mut self, name: &str, offset: u64, len: u64) -> Result<(), EngineError> {
        let end = offset.saturating_add(len);
        if end > self.total {
            return Err(malformed(
                name,
                format!(
                    "a piece of bytes {offset}..{end} runs past the tensor's {}",
                    self.total
                ),
            ));
        }
        if len == 0 && self.total > 0 {
            return Err(malformed(
                name,
                format!("an empty piece at offset {offset}"),
            ));
        }
        let at = self.ranges.partition_point(|r| r.0 < offset);
        let after_prev = at == 0 || self.ranges[at - 1].1 <= offset;
        let before_next = self.ranges.get(at).is_none_or(|r| r.0 >= end);
        if !after_prev || !before_next {
            return Err(malformed(
                name,
                format!("bytes {offset}..{end} arrived twice"),
            ));
        }
        self.ranges.insert(at, (offset, end));
        self.got += len;
        Ok(())
    }
}

impl Pieces {
    /// The staging tensor piece `h` is read into (at `h.offset`): staged in `asm` at the
    /// tensor's first piece, else the one its earlier pieces went to.
    pub(super) fn place(
        &mut self,
        asm: &mut WeightAssembler,
        shared: &Shared,
        h: &TensorHeader,
    ) -> Result<Tensor, EngineError> {
        if let Some(o) = self.open.get_mut(&h.name) {
            if o.dtype != h.dtype || o.shape != h.shape {
                return Err(malformed(
                    &h.name,
                    format!(
                        "a piece of dtype {} and shape {:?}, its first piece's were {} and {:?}",
                        h.dtype, h.shape, o.dtype, o.shape
                    ),
                ));
            }
            o.claim(&h.name, h.offset, h.num_bytes)?;
            let tensor = o.tensor.shallow_clone();
            if o.got == o.total {
                self.open.remove(&h.name);
            }
            return Ok(tensor);
        }
        // `stage` checks the name, shape and dtype before the length, so a bad shape or
        // dtype is reported as such, not as this placeholder length.
        let total = wire_dtype(h.dtype)
            .and_then(|d| dp::tensor_bytes(&h.shape, d.size() as u64))
            .unwrap_or(u64::MAX);
        let whole = TensorHeader {
            num_bytes: total,
            offset: 0,
            ..h.clone()
        };
        let tensor = stage(asm, shared, &whole)?;
        let mut open = Open {
            tensor: tensor.shallow_clone(),
            dtype: h.dtype,
            shape: h.shape.clone(),
            total,
            got: 0,
            ranges: vec![],
        };
        open.claim(&h.name, h.offset, h.num_bytes)?;
        if open.got < open.total {
            self.open.insert(h.name.clone(), open);
        }
        Ok(tensor)
    }

    /// Errors, naming them, if some tensors are missing pieces.
    pub(super) fn complete(&self) -> Result<(), EngineError> {
        if self.open.is_empty() {
            return Ok(());
        }
        let mut names: Vec<String> = self
            .open
            .iter()
            .map(|(n, o)| format!("{n} ({} of {} bytes)", o.got, o.total))
            .collect();
        names.sort();
        Err(WeightError::Incomplete {
            count: names.len(),
            names: names.into_iter().take(4).collect(),
        }
        .into())
    }
}
