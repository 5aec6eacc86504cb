//! Real-token packing (`model::packing`) against the padded forward it replaces: the
//! hidden states of every real position and every weight gradient agree within f32
//! rounding (1e-5 relative), for Qwen2 and Qwen3 (per-head norms), with left padding
//! (an attention mask) and with shared-prefix rows (segments, right padding).
use model::{ForwardInput, ModelConfig, Transformer, Weights};
use tch::{Device, Kind, Tensor};

fn model(model_type: &str) -> Transformer {
    let raw = serde_json::json!({
        "model_type": model_type, "vocab_size": 97, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
        "tie_word_embeddings": false
    });
    let cfg = ModelConfig::from_json(raw, std::path::Path::new("test")).unwrap();
    tch::manual_seed(7);
    let mut w = Weights::random(&cfg, Kind::Float, Device::Cpu);
    w.set_requires_grad(true);
    Transformer::new(cfg, w)
}

/// Final hidden states `[B, T, H]` (zeros at padding when packed) and the loss over the
/// real positions `real` (`[B, T]` f32), backward run.
fn run(m: &Transformer, input: &ForwardInput, real: &Tensor, pack: bool) -> Tensor {
    let h = if pack {
        let ctx = m.context(input, None).unwrap().pack_real_tokens(0.0);
        assert!(ctx.packing.is_some(), "the batch has padding");
        m.training_hidden_states(input, 0.0).unwrap()
    } else {
        m.hidden_states(input, None).unwrap()
    };
    let logp = m.logits(&h).log_softmax(-1, Kind::Float);
    (logp.select(-1, 5) * real).sum(Kind::Float).backward();
    h.detach() * real.unsqueeze(-1)
}

fn grads(m: &Transformer) -> Vec<(String, Tensor)> {
    m.weights
        .named()
        .into_iter()
        .map(|(n, t)| {
            let g = t.grad().copy();
            let _ = t.grad().zero_();
            (n, g)
        })
        .collect()
}

fn close(what: &str, a: &Tensor, b: &Tensor) {
    let scale = a.abs().max().double_value(&[]).max(1e-6);
    let diff = (a - b).abs().max().double_value(&[]);
    assert!(
        diff <= 1e-5 * scale,
        "{what}: max diff {diff} (scale {scale})"
    );
}

fn check(m: &Transformer, input: &ForwardInput, real: &Tensor) {
    let padded = run(m, input, real, false);
    let g_padded = grads(m);
    let packed = run(m, input, real, true);
    let g_packed = grads(m);
    close("hidden states", &padded, &packed);
    assert_eq!(g_padded.len(), g_packed.len());
    for ((name, a), (_, b)) in g_padded.iter().zip(&g_packed) {
        assert!(
            a.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name}: no gradient"
        );
        close(name, a, b);
    }
}

#[test]
fn packed_left_padding_equals_padded() {
    for arch in ["qwen2", "qwen3"] {
        let m = model(arch);
        let ids = Tensor::randint_low(1, 97, [3, 9], (Kind::Int64, Device::Cpu));
        let mask = Tensor::from_slice(&[
            1i64, 1, 1, 1, 1, 1, 1, 1, 1, // full
            0, 0, 0, 1, 1, 1, 1, 1, 1, // 3 left padding
            0, 0, 0, 0, 0, 0, 1, 1, 1, // 6 left padding
        ])
        .view([3, 9]);
        let input = ForwardInput::new(&ids).with_mask(&mask);
        check(&m, &input, &mask.to_kind(Kind::Float));
    }
}

#[test]
fn packed_shared_prefix_rows_equal_padded() {
    for arch in ["qwen2", "qwen3"] {
        let m = model(arch);
        // Row 0: prompt of 3, completions of 3 and 2; row 1: prompt of 2, one of 4.
        let seg =
            Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1, 2, 2, 0, 0, 1, 1, 1, 1, -1, -1]).view([2, 8]);
        let pos =
            Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 3, 4, 0, 1, 2, 3, 4, 5, 0, 0]).view([2, 8]);
        let ids = Tensor::randint_low(1, 97, [2, 8], (Kind::Int64, Device::Cpu));
        let input = ForwardInput::new(&ids)
            .with_positions(&pos)
            .with_segments(&seg);
        check(&m, &input, &seg.ge(0).to_kind(Kind::Float));
    }
}
