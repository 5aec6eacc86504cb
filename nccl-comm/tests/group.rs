//! The NCCL group on one GPU: a world of one broadcasts in place, and a bounded join
//! whose peer never comes fails within its timeout instead of hanging (what rank 0 relies
//! on when a worker refuses `InitWeightSync`). Both need a CUDA device and libnccl and
//! skip with a message without them.
use std::time::{Duration, Instant};

use nccl_comm::{nccl_dtype, probe, Group, NcclError, UniqueId};
use tch::{Device, Kind, Tensor};

fn gpu(test: &str) -> bool {
    if let Err(e) = probe(0) {
        eprintln!("skipping {test}: {e}");
        return false;
    }
    true
}

#[test]
fn a_world_of_one_broadcasts_in_place_gpu() {
    if !gpu("a_world_of_one_broadcasts_in_place_gpu") {
        return;
    }
    let id = UniqueId::new().unwrap();
    let mut g = Group::join_bounded(&id, 1, 0, 0, Duration::from_secs(30)).unwrap();
    let t = Tensor::arange(1000, (Kind::BFloat16, Device::Cuda(0)));
    let before = t.copy();
    // SAFETY: t is a contiguous CUDA tensor of 1000 bf16 elements, alive across the call.
    unsafe { g.broadcast_raw(t.data_ptr(), 1000, nccl_dtype(Kind::BFloat16).unwrap(), 0) }.unwrap();
    assert!(t.equal(&before));
    let e = unsafe { g.broadcast_raw(t.data_ptr(), 1, nccl_dtype(Kind::BFloat16).unwrap(), 1) }
        .unwrap_err();
    assert!(
        e.to_string().contains("root 1 is outside a world of 1"),
        "{e}"
    );
}

#[test]
fn a_join_without_its_peer_times_out_gpu() {
    if !gpu("a_join_without_its_peer_times_out_gpu") {
        return;
    }
    let id = UniqueId::new().unwrap();
    let t0 = Instant::now();
    let e = Group::join_bounded(&id, 2, 0, 0, Duration::from_secs(3))
        .err()
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "bounded: {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(
            e,
            NcclError::Call {
                op: "comm_init_rank",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unique_ids_round_trip_and_bad_lengths_are_named() {
    let e = UniqueId::from_bytes(&[0; 12]).err().unwrap();
    assert_eq!(
        e,
        NcclError::BadId {
            expected: 128,
            found: 12
        }
    );
    assert!(e.to_string().contains("128") && e.to_string().contains("12"));
    let bytes: Vec<u8> = (0..128u8).collect();
    assert_eq!(UniqueId::from_bytes(&bytes).unwrap().to_bytes(), bytes);
}
