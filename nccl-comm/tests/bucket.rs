//! Bucket pack/unpack: exact round trips through buckets smaller than the tensors (so
//! they split), in bf16 and f32, with a tied weight sent under two names; and the
//! errors for bad segments. `bucket_round_trip_gpu` does the same on one CUDA device.

use nccl_comm::bucket::{check_segment, unpack, BucketError, Packer, Segment};
use tch::{Device, Kind, Tensor};

/// Packs `tensors` through a bucket of `capacity` elements of `kind` on `device` and
/// unpacks every bucket into fresh targets of the tensors' kinds; returns the targets
/// and the number of buckets sent.
fn round_trip(
    tensors: &[(&str, &Tensor)],
    capacity: i64,
    kind: Kind,
    device: Device,
) -> (Vec<Tensor>, usize) {
    let mut packer = Packer::new(Tensor::zeros([capacity], (kind, device))).unwrap();
    let targets: Vec<Tensor> = tensors
        .iter()
        .map(|(_, t)| Tensor::full(t.size(), f64::NAN, (t.kind(), device)))
        .collect();
    let mut buckets = 0;
    let deliver = |packer: &mut Packer| {
        // A receiver's own staging bucket: what the broadcast would have written.
        let staging = packer.bucket().copy();
        for seg in packer.take() {
            let i = tensors.iter().position(|(n, _)| *n == seg.name).unwrap();
            unpack(&staging, &seg, &targets[i]).unwrap();
        }
    };
    for (name, t) in tensors {
        let mut from = 0;
        while !packer.fill(name, t, &mut from).unwrap() {
            deliver(&mut packer);
            buckets += 1;
        }
    }
    if !packer.is_empty() {
        deliver(&mut packer);
        buckets += 1;
    }
    (targets, buckets)
}

fn model(kind: Kind, device: Device) -> Vec<(String, Tensor)> {
    tch::manual_seed(7);
    let embed = Tensor::randn([37, 8], (Kind::Float, device)).to_kind(kind);
    vec![
        ("model.embed_tokens.weight".into(), embed.shallow_clone()),
        (
            "model.layers.0.mlp.up_proj.weight".into(),
            Tensor::randn([19, 8], (Kind::Float, device)).to_kind(kind),
        ),
        (
            "model.norm.weight".into(),
            Tensor::ones([8], (kind, device)),
        ),
        ("empty".into(), Tensor::zeros([0, 8], (kind, device))),
        // Tied: the same storage under a second name.
        ("lm_head.weight".into(), embed),
    ]
}

fn check_exact(kind: Kind, device: Device) {
    let model = model(kind, device);
    let refs: Vec<(&str, &Tensor)> = model.iter().map(|(n, t)| (n.as_str(), t)).collect();
    // 100 elements: the 296-element embedding spans four buckets.
    let (out, buckets) = round_trip(&refs, 100, kind, device);
    let total: i64 = model.iter().map(|(_, t)| t.numel() as i64).sum();
    assert_eq!(
        buckets as i64,
        (total + 99) / 100,
        "buckets are filled to the brim"
    );
    for ((name, t), got) in model.iter().zip(&out) {
        assert!(t.equal(got), "{name} {kind:?} differs after the round trip");
    }
}

#[test]
fn bf16_and_f32_round_trip_exactly_across_buckets() {
    check_exact(Kind::BFloat16, Device::Cpu);
    check_exact(Kind::Float, Device::Cpu);
}

#[test]
fn f32_tensors_in_a_bf16_bucket_are_rounded_like_torch() {
    let t = Tensor::randn([5, 7], (Kind::Float, Device::Cpu));
    let (out, buckets) = round_trip(&[("w", &t)], 8, Kind::BFloat16, Device::Cpu);
    assert_eq!(buckets, 5);
    assert!(out[0].equal(&t.to_kind(Kind::BFloat16).to_kind(Kind::Float)));
}

#[test]
fn segments_record_the_split() {
    let mut p = Packer::new(Tensor::zeros([10], (Kind::Float, Device::Cpu))).unwrap();
    let a = Tensor::ones([3, 2], (Kind::Float, Device::Cpu));
    let b = Tensor::ones([7], (Kind::Float, Device::Cpu));
    let mut from = 0;
    assert!(p.fill("a", &a, &mut from).unwrap());
    from = 0;
    assert!(!p.fill("b", &b, &mut from).unwrap(), "b does not fit whole");
    assert_eq!((from, p.used()), (4, 10));
    let first = p.take();
    assert_eq!(
        first,
        vec![
            Segment {
                name: "a".into(),
                shape: vec![3, 2],
                tensor_offset: 0,
                bucket_offset: 0,
                len: 6
            },
            Segment {
                name: "b".into(),
                shape: vec![7],
                tensor_offset: 0,
                bucket_offset: 6,
                len: 4
            },
        ]
    );
    assert!(p.fill("b", &b, &mut from).unwrap());
    let second = p.take();
    assert_eq!(
        second,
        vec![Segment {
            name: "b".into(),
            shape: vec![7],
            tensor_offset: 4,
            bucket_offset: 0,
            len: 3
        }]
    );
}

#[test]
fn bad_buckets_tensors_and_segments_are_refused_by_name() {
    let e = Packer::new(Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)))
        .err()
        .unwrap();
    assert!(matches!(e, BucketError::BadBucket { .. }), "{e}");
    assert!(Packer::new(Tensor::zeros([4], (Kind::Int64, Device::Cpu))).is_err());
    assert!(Packer::new(Tensor::zeros([0], (Kind::Float, Device::Cpu))).is_err());
    let mut p = Packer::new(Tensor::zeros([4], (Kind::Float, Device::Cpu))).unwrap();
    let e = p
        .fill("ids", &Tensor::from_slice(&[1i64]), &mut 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ids") && e.contains("Int64"), "{e}");

    let seg = |tensor_offset, bucket_offset, len| Segment {
        name: "w".into(),
        shape: vec![2, 3],
        tensor_offset,
        bucket_offset,
        len,
    };
    assert!(check_segment(&seg(0, 0, 6), 6).is_ok());
    let e = check_segment(&seg(4, 0, 3), 6).unwrap_err().to_string();
    assert!(
        e.contains("w") && e.contains("exceed its 6 elements"),
        "{e}"
    );
    let e = check_segment(&seg(0, 2, 6), 6).unwrap_err().to_string();
    assert!(e.contains("exceed the bucket's 6"), "{e}");
    let e = check_segment(&seg(usize::MAX, 0, 2), 6)
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceed"), "{e}");
    let neg = Segment {
        shape: vec![-1],
        ..seg(0, 0, 0)
    };
    assert!(check_segment(&neg, 6).is_err());
    let bucket = Tensor::zeros([6], (Kind::Float, Device::Cpu));
    let wrong = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
    let e = unpack(&bucket, &seg(0, 0, 6), &wrong)
        .unwrap_err()
        .to_string();
    assert!(e.contains("target shape [3, 2]"), "{e}");
}

#[test]
fn bucket_round_trip_gpu() {
    if !tch::Cuda::is_available() {
        eprintln!("skipping bucket_round_trip_gpu: no CUDA device");
        return;
    }
    check_exact(Kind::BFloat16, Device::Cuda(0));
    check_exact(Kind::Float, Device::Cuda(0));
}
