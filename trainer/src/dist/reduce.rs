//! Host-side reduction kernels of the CPU ring: `dst = op(dst, src)` elementwise over
//! byte buffers holding `dtype` elements. bf16 and f16 are widened to f32 for each
//! operation and rounded back to nearest-even, as PyTorch's CPU kernels do, so a
//! ring sum of exactly representable values is exact.

use bytemuck::Pod;
use half::{bf16, f16};

use super::comm::{Dtype, ReduceOp};
use super::error::CommError;

/// `dst[i] = op(dst[i], src[i])`. `Avg` sums here; the division happens once at the
/// end of the collective. Both buffers must hold whole, aligned elements of `dtype`.
pub(crate) fn reduce_into(
    dtype: Dtype,
    op: ReduceOp,
    dst: &mut [u8],
    src: &[u8],
) -> Result<(), CommError> {
    match (dtype, op) {
        (Dtype::F32, ReduceOp::Sum | ReduceOp::Avg) => zip::<f32>(dst, src, |a, b| a + b),
        (Dtype::F32, ReduceOp::Max) => zip::<f32>(dst, src, max_f32),
        (Dtype::Bf16, ReduceOp::Sum | ReduceOp::Avg) => {
            zip::<bf16>(dst, src, |a, b| bf16::from_f32(a.to_f32() + b.to_f32()))
        }
        (Dtype::Bf16, ReduceOp::Max) => zip::<bf16>(dst, src, |a, b| {
            bf16::from_f32(max_f32(a.to_f32(), b.to_f32()))
        }),
        (Dtype::F16, ReduceOp::Sum | ReduceOp::Avg) => {
            zip::<f16>(dst, src, |a, b| f16::from_f32(a.to_f32() + b.to_f32()))
        }
        (Dtype::F16, ReduceOp::Max) => zip::<f16>(dst, src, |a, b| {
            f16::from_f32(max_f32(a.to_f32(), b.to_f32()))
        }),
        // Integer sums wrap like PyTorch's instead of panicking on peer data.
        (Dtype::I64, ReduceOp::Sum | ReduceOp::Avg) => zip::<i64>(dst, src, i64::wrapping_add),
        (Dtype::I64, ReduceOp::Max) => zip::<i64>(dst, src, i64::max),
    }
}

/// Maximum that propagates NaN from either side, like `torch.maximum`.
fn max_f32(a: f32, b: f32) -> f32 {
    if b > a || b.is_nan() {
        b
    } else {
        a
    }
}

fn zip<T: Pod>(dst: &mut [u8], src: &[u8], f: impl Fn(T, T) -> T) -> Result<(), CommError> {
    let misaligned = |_| {
        CommError::invalid(
            "reduce",
            "buffer is not a whole number of aligned elements of its dtype",
        )
    };
    let dst: &mut [T] = bytemuck::try_cast_slice_mut(dst).map_err(misaligned)?;
    let src: &[T] = bytemuck::try_cast_slice(src).map_err(misaligned)?;
    if dst.len() != src.len() {
        return Err(CommError::invalid("reduce", "buffers differ in length"));
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f(*d, *s);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: Pod>(v: &[T]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    #[test]
    fn every_dtype_and_op() {
        let mut d = bytes(&[1.5f32, -2.0, f32::NAN, 3.0]);
        reduce_into(
            Dtype::F32,
            ReduceOp::Sum,
            &mut d,
            &bytes(&[0.5f32, 2.0, 1.0, -4.0]),
        )
        .unwrap();
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(&d);
        assert_eq!(&got[..2], &[2.0, 0.0]);
        assert!(got[2].is_nan());
        assert_eq!(got[3], -1.0);

        let mut d = bytes(&[1.0f32, 5.0, 2.0]);
        reduce_into(
            Dtype::F32,
            ReduceOp::Max,
            &mut d,
            &bytes(&[3.0f32, -1.0, f32::NAN]),
        )
        .unwrap();
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(&d);
        assert_eq!(&got[..2], &[3.0, 5.0]);
        assert!(got[2].is_nan());

        let mut d = bytes(&[bf16::from_f32(1.0), bf16::from_f32(256.0)]);
        let s = bytes(&[bf16::from_f32(2.0), bf16::from_f32(1.0)]);
        reduce_into(Dtype::Bf16, ReduceOp::Avg, &mut d, &s).unwrap();
        let got: Vec<bf16> = bytemuck::pod_collect_to_vec(&d);
        // 257 is not representable in bf16 and rounds to even (256).
        assert_eq!(got, vec![bf16::from_f32(3.0), bf16::from_f32(256.0)]);

        let mut d = bytes(&[f16::from_f32(-1.0), f16::from_f32(7.0)]);
        reduce_into(
            Dtype::F16,
            ReduceOp::Max,
            &mut d,
            &bytes(&[f16::from_f32(0.5), f16::from_f32(6.0)]),
        )
        .unwrap();
        let got: Vec<f16> = bytemuck::pod_collect_to_vec(&d);
        assert_eq!(got, vec![f16::from_f32(0.5), f16::from_f32(7.0)]);

        let mut d = bytes(&[i64::MAX, -3]);
        reduce_into(Dtype::I64, ReduceOp::Sum, &mut d, &bytes(&[1i64, 10])).unwrap();
        assert_eq!(
            bytemuck::pod_collect_to_vec::<u8, i64>(&d),
            vec![i64::MIN, 7]
        );
        reduce_into(Dtype::I64, ReduceOp::Max, &mut d, &bytes(&[0i64, 2])).unwrap();
        assert_eq!(bytemuck::pod_collect_to_vec::<u8, i64>(&d), vec![0, 7]);
    }

    #[test]
    fn ragged_buffers_are_errors_not_panics() {
        let mut d = vec![0u8; 6];
        assert!(reduce_into(Dtype::F32, ReduceOp::Sum, &mut d, &[0u8; 6]).is_err());
        let mut d = [0u8; 8];
        assert!(reduce_into(Dtype::F32, ReduceOp::Sum, &mut d[..4], &[0u8; 8]).is_err());
    }
}
