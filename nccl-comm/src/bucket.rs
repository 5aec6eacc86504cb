//! Weight buckets: named tensors packed into one reused flat buffer (`[capacity]`, the
//! wire dtype) and copied back out, so a weight push is a few large broadcasts instead
//! of one per tensor.
//!
//! The sender fills a [`Packer`] tensor by tensor; a tensor that does not fit in the
//! space left is split (its first elements end this bucket, the rest start the next).
//! Each full bucket goes out with its [`Segment`] list (name, shape, element ranges),
//! which the receiver checks with [`check_segment`] and copies out with [`unpack`].
//! Pure tensor code: the same functions run on CPU buffers (the tests) and on CUDA ones.

use tch::{Kind, Tensor};

/// The largest bucket a receiver allocates (elements; 1 GiB of bf16): a worker refuses
/// a larger `InitWeightSync`, and the trainer's `update_weights_bucket_megabytes` is
/// bounded by it.
pub const MAX_BUCKET_ELEMENTS: u64 = 1 << 29;

/// One tensor's elements `tensor_offset..tensor_offset + len` (row-major) at
/// `bucket_offset..bucket_offset + len` of a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub name: String,
    pub shape: Vec<i64>,
    pub tensor_offset: usize,
    pub bucket_offset: usize,
    pub len: usize,
}

impl Segment {
    /// Elements of the whole tensor (an error for a negative dimension).
    pub fn numel(&self) -> Result<usize, BucketError> {
        numel(&self.name, &self.shape)
    }
}

fn numel(name: &str, shape: &[i64]) -> Result<usize, BucketError> {
    shape.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d)
            .ok()
            .and_then(|d| n.checked_mul(d))
            .ok_or_else(|| BucketError::Segment {
                name: name.to_string(),
                message: format!("shape {shape:?} has a negative or too large dimension"),
            })
    })
}

/// Why a tensor could not be packed or unpacked. Every variant names what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BucketError {
    #[error(
        "a bucket must be a non-empty 1-D contiguous float tensor, got {kind:?} of shape {shape:?}"
    )]
    BadBucket { kind: Kind, shape: Vec<i64> },
    #[error("tensor {name}: {kind:?} is not a float kind")]
    NotFloat { name: String, kind: Kind },
    #[error("tensor {name}: {message}")]
    Segment { name: String, message: String },
    #[error("tensor {name}: tensor operation failed: {message}")]
    Torch { name: String, message: String },
}

fn torch(name: &str) -> impl Fn(tch::TchError) -> BucketError + '_ {
    move |e| BucketError::Torch {
        name: name.to_string(),
        message: e.to_string(),
    }
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Double | Kind::Float | Kind::Half | Kind::BFloat16
    )
}

/// Fills one reused bucket with tensors, segment by segment.
pub struct Packer {
    bucket: Tensor,
    capacity: usize,
    used: usize,
    segments: Vec<Segment>,
}

impl Packer {
    /// A packer over `bucket` (`[capacity]`, the wire dtype, on the device the
    /// broadcast runs on), which it reuses for every bucket.
    pub fn new(bucket: Tensor) -> Result<Packer, BucketError> {
        let (kind, shape) = (bucket.kind(), bucket.size());
        if shape.len() != 1 || shape[0] == 0 || !is_float(kind) || !bucket.is_contiguous() {
            return Err(BucketError::BadBucket { kind, shape });
        }
        Ok(Packer {
            capacity: shape[0] as usize,
            bucket,
            used: 0,
            segments: vec![],
        })
    }

    /// The buffer (all `capacity` elements; only `used()` of them hold this bucket).
    pub fn bucket(&self) -> &Tensor {
        &self.bucket
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Elements packed into the current bucket.
    pub fn used(&self) -> usize {
        self.used
    }

    /// No segment packed since the last [`take`](Self::take).
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Copies elements `*from..` of `t` (any float kind and device; converted to the
    /// bucket's kind) into the space left, advancing `*from`. Returns `true` once all of
    /// `t` is placed, `false` when the bucket is full first: send it, [`take`](Self::take)
    /// its segments and call again. An empty tensor takes an empty segment.
    pub fn fill(&mut self, name: &str, t: &Tensor, from: &mut usize) -> Result<bool, BucketError> {
        let kind = t.f_kind().map_err(torch(name))?;
        if !is_float(kind) {
            return Err(BucketError::NotFloat {
                name: name.to_string(),
                kind,
            });
        }
        let shape = t.size();
        let total = numel(name, &shape)?;
        if *from > total {
            return Err(BucketError::Segment {
                name: name.to_string(),
                message: format!("offset {} beyond its {total} elements", *from),
            });
        }
        if total == 0 {
            self.segments.push(Segment {
                name: name.to_string(),
                shape,
                tensor_offset: 0,
                bucket_offset: self.used,
                len: 0,
            });
            return Ok(true);
        }
        if *from == total {
            return Ok(true);
        }
        let len = (total - *from).min(self.capacity - self.used);
        if len == 0 {
            return Ok(false);
        }
        let _g = tch::no_grad_guard();
        let src = t
            .detach()
            .f_reshape([-1])
            .and_then(|f| f.f_narrow(0, *from as i64, len as i64))
            .map_err(torch(name))?;
        self.bucket
            .f_narrow(0, self.used as i64, len as i64)
            .and_then(|mut dst| dst.f_copy_(&src))
            .map_err(torch(name))?;
        self.segments.push(Segment {
            name: name.to_string(),
            shape,
            tensor_offset: *from,
            bucket_offset: self.used,
            len,
        });
        self.used += len;
        *from += len;
        Ok(*from == total)
    }

    /// The segments of the current bucket; the bucket starts empty again.
    pub fn take(&mut self) -> Vec<Segment> {
        self.used = 0;
        std::mem::take(&mut self.segments)
    }
}

/// Checks a received segment against a bucket of `capacity` elements: both ranges in
/// bounds, a known shape. Call before [`unpack`] on anything that came off the wire.
pub fn check_segment(seg: &Segment, capacity: usize) -> Result<(), BucketError> {
    let bad = |message: String| BucketError::Segment {
        name: seg.name.clone(),
        message,
    };
    let total = seg.numel()?;
    let tensor_end = seg.tensor_offset.checked_add(seg.len);
    if tensor_end.is_none_or(|e| e > total) {
        return Err(bad(format!(
            "elements {}..+{} exceed its {total} elements",
            seg.tensor_offset, seg.len
        )));
    }
    let bucket_end = seg.bucket_offset.checked_add(seg.len);
    if bucket_end.is_none_or(|e| e > capacity) {
        return Err(bad(format!(
            "bucket elements {}..+{} exceed the bucket's {capacity}",
            seg.bucket_offset, seg.len
        )));
    }
    Ok(())
}

/// Copies `seg` out of `bucket` into `target`, a contiguous tensor of `seg.shape` (any
/// float kind and device; converted from the bucket's kind). Checks the segment first.
pub fn unpack(bucket: &Tensor, seg: &Segment, target: &Tensor) -> Result<(), BucketError> {
    let name = seg.name.as_str();
    let capacity = bucket.numel();
    check_segment(seg, capacity)?;
    if target.size() != seg.shape {
        return Err(BucketError::Segment {
            name: name.to_string(),
            message: format!(
                "target shape {:?} differs from the segment's {:?}",
                target.size(),
                seg.shape
            ),
        });
    }
    if !target.is_contiguous() {
        return Err(BucketError::Segment {
            name: name.to_string(),
            message: "the target tensor is not contiguous".into(),
        });
    }
    if seg.len == 0 {
        return Ok(());
    }
    let _g = tch::no_grad_guard();
    let src = bucket
        .f_narrow(0, seg.bucket_offset as i64, seg.len as i64)
        .map_err(torch(name))?;
    target
        .f_view([-1])
        .and_then(|f| f.f_narrow(0, seg.tensor_offset as i64, seg.len as i64))
        .and_then(|mut dst| dst.f_copy_(&src))
        .map_err(torch(name))?;
    Ok(())
}
