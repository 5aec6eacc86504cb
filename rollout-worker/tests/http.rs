//! The OpenAI-compatible HTTP API, /metrics and /health on 127.0.0.1:0 with the tiny
//! Qwen2 fixture, plus the bad-input and overload cases of both front ends.
mod common;

use common::*;
use proto::v1 as pb;
use serde_json::{json, Value};

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The `data:` payloads of an SSE response, in order.
async fn post_sse(url: &str, body: Value) -> Vec<String> {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_completions_and_chat_match_the_model() {
    let w = Worker::start(tiny_config()).await;
    let model = load_model("qwen2-tiny");
    let u = &w.http_url;
    let models: Value = reqwest::get(format!("{u}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "qwen2-tiny");
    assert_eq!(models["data"][0]["max_model_len"], 256);

    let prompt = vec![5i64, 17, 42, 99, 3];
    let (status, r) = post(
        &format!("{u}/v1/completions"),
        json!({"model": "qwen2-tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
               "n": 2, "logprobs": 2, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    let expected = greedy_reference(&model, &prompt, 8);
    let reference = logprobs_reference(&model, &prompt, &expected, 1.0);
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, ch) in choices.iter().enumerate() {
        assert_eq!(ch["index"], i);
        assert_eq!(ch["finish_reason"], "length");
        let ids: Vec<i64> = serde_json::from_value(ch["token_ids"].clone()).unwrap();
        assert_eq!(ids, expected);
        let lps: Vec<f32> =
            serde_json::from_value(ch["logprobs"]["token_logprobs"].clone()).unwrap();
        assert_close(&lps, &reference, 1e-4, "HTTP logprobs");
        let tops = ch["logprobs"]["top_logprobs"].as_array().unwrap();
        assert_eq!(tops.len(), 8);
        // Greedy: the sampled token is the most likely one, so its log-prob is the top one.
        let best = tops[0]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((best - lps[0] as f64).abs() < 1e-5);
    }
    assert_eq!(r["usage"]["prompt_tokens"], 5);
    assert_eq!(r["usage"]["completion_tokens"], 16);

    // Text prompts are tokenized; the text returned is the decoded completion.
    let (status, r) = post(
        &format!("{u}/v1/completions"),
        json!({"prompt": ["hello there", "x"], "max_tokens": 5, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let tok = w.engine.tokenizer();
    let ids: Vec<i64> = tok
        .encode("hello there", true)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let expected = greedy_reference(&model, &ids, 5);
    let text = tok
        .decode(
            &expected.iter().map(|&t| t as u32).collect::<Vec<_>>(),
            true,
        )
        .unwrap();
    assert_eq!(r["choices"][0]["text"], text);
    assert_eq!(r["choices"].as_array().unwrap().len(), 2);

    // Chat: the prompt is the chat template's rendering.
    let (status, r) = post(
        &format!("{u}/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 6,
               "temperature": 0, "logprobs": true, "top_logprobs": 3, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    let opts = model::tokenizer::ChatTemplateOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    let chat_ids: Vec<i64> = tok
        .encode_chat(
            &[model::tokenizer::ChatMessage::user("What is 2 + 3?")],
            &opts,
        )
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let expected = greedy_reference(&model, &chat_ids, 6);
    let ids: Vec<i64> = serde_json::from_value(r["choices"][0]["token_ids"].clone()).unwrap();
    assert_eq!(ids, expected);
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 6);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(r["usage"]["prompt_tokens"], chat_ids.len());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_deltas_concatenate_to_the_full_text_and_stop_strings_cut_it() {
    let w = Worker::start(tiny_config()).await;
    let u = &w.http_url;
    let body = json!({"prompt": "The answer is", "max_tokens": 24, "temperature": 0, "ignore_eos": true, "n": 2});
    let (_, full) = post(&format!("{u}/v1/completions"), body.clone()).await;
    let full_text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let events = post_sse(&format!("{u}/v1/completions"), sbody).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut texts = [String::new(), String::new()];
    let mut finishes = vec![None, None];
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let ch = &v["choices"][0];
        let i = ch["index"].as_u64().unwrap() as usize;
        texts[i].push_str(ch["text"].as_str().unwrap());
        if !ch["finish_reason"].is_null() {
            finishes[i] = Some(ch["finish_reason"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(texts[0], full_text);
    assert_eq!(texts[1], full_text);
    assert_eq!(
        finishes,
        vec![Some("length".to_string()), Some("length".to_string())]
    );

    // A stop string taken from the middle of the text ends the completion before it,
    // streamed or not.
    let chars: Vec<char> = full_text.chars().collect();
    assert!(chars.len() >= 8, "{full_text:?}");
    let stop: String = chars[4..6].iter().collect();
    let cut = &full_text[..full_text.find(&stop).unwrap()];
    let mut stopped = body.clone();
    stopped["stop"] = json!([stop]);
    stopped["n"] = json!(1);
    let (_, r) = post(&format!("{u}/v1/completions"), stopped.clone()).await;
    assert_eq!(r["choices"][0]["text"], cut);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    stopped["stream"] = json!(true);
    let events = post_sse(&format!("{u}/v1/completions"), stopped).await;
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, cut);

    // Chat streaming: role first, content deltas, finish reason, [DONE].
    let events = post_sse(
        &format!("{u}/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
               "stream": true, "ignore_eos": true}),
    )
    .await;
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(events.len(), 5 + 1 + 1);
    w.stop().await;
}

/// The streamed text deltas of choice 0, concatenated.
fn streamed_text(events: &[String]) -> String {
    assert_eq!(events.last().unwrap(), "[DONE]");
    events[..events.len() - 1]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_sampled_text_with_split_multi_byte_characters_matches_the_full_text() {
    let w = Worker::start(tiny_config()).await;
    let u = &w.http_url;
    let tok = model::Tokenizer::from_dir(fixture("qwen2-tiny")).unwrap();
    let splits = |t: i64| tok.decode(&[t as u32], true).unwrap().contains('\u{FFFD}');
    // Sampling at temperature 1 from the random fixture draws byte tokens that split
    // multi-byte characters (alone they decode to U+FFFD); take the first seed whose
    // completion has both such a token and a whole multi-byte character.
    let mut found = None;
    for seed in 0..32 {
        let body = json!({"prompt": "The answer is", "max_tokens": 64, "temperature": 1.0,
                          "seed": seed, "ignore_eos": true});
        let (_, full) = post(&format!("{u}/v1/completions"), body.clone()).await;
        let ids: Vec<i64> =
            serde_json::from_value(full["choices"][0]["token_ids"].clone()).unwrap();
        let text = full["choices"][0]["text"].as_str().unwrap().to_string();
        let whole = text.chars().any(|c| c.len_utf8() > 1 && c != '\u{FFFD}');
        if whole && ids.iter().any(|&t| splits(t)) {
            found = Some((body, ids, text));
            break;
        }
    }
    let (body, ids, text) = found.expect("no seed in 0..32 samples a split multi-byte character");
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    assert_eq!(
        streamed_text(&post_sse(&format!("{u}/v1/completions"), sbody).await),
        text
    );

    // A stop string that begins with a multi-byte character (or, failing one, from the middle).
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let k = chars
        .iter()
        .position(|&(i, c)| i > 0 && c.len_utf8() > 1 && c != '\u{FFFD}')
        .unwrap_or(chars.len() / 2);
    let stop: String = chars[k..(k + 2).min(chars.len())]
        .iter()
        .map(|&(_, c)| c)
        .collect();
    let cut = &text[..text.find(&stop).unwrap()];
    let mut stopped = body.clone();
    stopped["stop"] = json!([stop]);
    let (_, r) = post(&format!("{u}/v1/completions"), stopped.clone()).await;
    assert_eq!(r["choices"][0]["text"], cut);
    assert_eq!(
        r["choices"][0]["finish_reason"], "stop",
        "{text:?} {stop:?} {ids:?}"
    );
    stopped["stream"] = json!(true);
    assert_eq!(
        streamed_text(&post_sse(&format!("{u}/v1/completions"), stopped).await),
        cut
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_report_the_work_done() {
    let w = Worker::start(tiny_config()).await;
    let u = &w.http_url;
    let health: Value = reqwest::get(format!("{u}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let (status, _) = post(
        &format!("{u}/v1/completions"),
        json!({"prompt": [1, 2, 3], "max_tokens": 7, "n": 3, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200);
    let text = reqwest::get(format!("{u}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Every series carries vLLM's `model_name` label (the served model name); the
    // lookups below then ignore it.
    let model = w.engine.info().name.clone();
    let label = format!("model_name=\"{model}\"");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.contains(&label), "{line} lacks {label}");
    }
    let text = text
        .replace(&format!("{{{label}}}"), "")
        .replace(&format!(",{label}"), "")
        .replace(&format!("{label},"), "");
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("vllm:generation_tokens_total"), 21.0);
    assert_eq!(value("vllm:prompt_tokens_total"), 9.0);
    assert_eq!(
        value("vllm:request_success_total{finished_reason=\"length\"}"),
        3.0
    );
    assert_eq!(value("vllm:time_to_first_token_seconds_count"), 1.0);
    assert_eq!(value("vllm:e2e_request_latency_seconds_count"), 1.0);
    // 7 tokens per sequence: 6 gaps each.
    assert_eq!(value("vllm:inter_token_latency_seconds_count"), 18.0);
    assert_eq!(value("vllm:num_requests_running"), 0.0);
    assert_eq!(value("rollout_weight_version"), 0.0);
    assert!(text.contains("# HELP vllm:kv_cache_usage_perc "));
    assert!(text.contains("# TYPE vllm:time_to_first_token_seconds histogram"));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_and_http_400_naming_the_problem() {
    let mut cfg = tiny_config();
    cfg.engine.max_n = 4;
    let w = Worker::start(cfg).await;
    let mut c = w.client().await;
    let ok = || pb::GenerateRequest {
        prompts: vec![tokens_prompt("a", &[1, 2, 3])],
        n: 1,
        sampling: Some(sampling(1.0, 4, Some(1))),
        return_text: false,
    };
    let too_long: Vec<i64> = (0..300).map(|i| i % 400).collect();
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (
            pb::GenerateRequest {
                prompts: vec![],
                ..ok()
            },
            "at least one prompt",
        ),
        (
            pb::GenerateRequest {
                prompts: vec![tokens_prompt("e", &[])],
                ..ok()
            },
            "prompts[0] is empty",
        ),
        (
            pb::GenerateRequest {
                prompts: vec![pb::Prompt {
                    id: "x".into(),
                    input: None,
                }],
                ..ok()
            },
            "neither",
        ),
        (
            pb::GenerateRequest {
                prompts: vec![tokens_prompt("l", &too_long)],
                ..ok()
            },
            "max_model_len",
        ),
        (pb::GenerateRequest { n: 0, ..ok() }, "n must be in [1, 4]"),
        (pb::GenerateRequest { n: 5, ..ok() }, "n must be in [1, 4]"),
        (
            pb::GenerateRequest {
                sampling: Some(sampling(1.0, 256, None)),
                ..ok()
            },
            "max_new_tokens",
        ),
        (
            pb::GenerateRequest {
                sampling: Some(sampling(1.0, 0, None)),
                ..ok()
            },
            "max_new_tokens",
        ),
        (
            pb::GenerateRequest {
                prompts: vec![tokens_prompt("u", &[1, 448])],
                ..ok()
            },
            "token id 448",
        ),
        (
            pb::GenerateRequest {
                prompts: vec![tokens_prompt("u", &[-1])],
                ..ok()
            },
            "token id -1",
        ),
        (
            pb::GenerateRequest {
                sampling: Some(pb::SamplingParams {
                    top_p: Some(0.0),
                    ..sampling(1.0, 4, None)
                }),
                ..ok()
            },
            "top_p",
        ),
        (
            pb::GenerateRequest {
                sampling: Some(pb::SamplingParams {
                    temperature: Some(-1.0),
                    ..sampling(1.0, 4, None)
                }),
                ..ok()
            },
            "temperature",
        ),
        (
            pb::GenerateRequest {
                sampling: Some(pb::SamplingParams {
                    stop_token_ids: vec![9999],
                    ..sampling(1.0, 4, None)
                }),
                ..ok()
            },
            "stop_token_ids[0]",
        ),
    ];
    for (req, needle) in cases {
        let e = generate(&mut c, req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{needle}: {e:?}");
        assert!(
            e.message().contains(needle),
            "{needle:?} not in {:?}",
            e.message()
        );
    }
    let u = &w.http_url;
    let http_cases = vec![
        (
            json!({"prompt": [], "max_tokens": 4}),
            "at least one prompt",
        ),
        (
            json!({"prompt": [1, 2], "max_tokens": 4, "n": 0}),
            "n must be",
        ),
        (
            json!({"prompt": [1, 2], "max_tokens": 400}),
            "max_new_tokens",
        ),
        (
            json!({"prompt": [1, 5000], "max_tokens": 4}),
            "token id 5000",
        ),
        (
            json!({"prompt": too_long, "max_tokens": 4}),
            "max_model_len",
        ),
        (
            json!({"prompt": [1, 2], "max_tokens": 4, "top_p": 2.0}),
            "top_p",
        ),
        (json!({"prompt": 7}), "invalid request body"),
        (json!({"prompt": [1], "logprobs": 99}), "top_logprobs"),
    ];
    for (body, needle) in http_cases {
        let (status, r) = post(&format!("{u}/v1/completions"), body.clone()).await;
        assert_eq!(status, 400, "{body}: {r}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
    let (status, r) = post(
        &format!("{u}/v1/chat/completions"),
        json!({"messages": [], "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 400, "{r}");
    let (status, _) = post(
        &format!("{u}/v1/completions"),
        json!({"model": "gpt-9", "prompt": [1]}),
    )
    .await;
    assert_eq!(status, 404);
    // The worker still serves.
    assert_eq!(generate(&mut c, ok()).await.unwrap().len(), 1);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_resource_exhausted_and_http_429_then_recovers() {
    let mut cfg = tiny_config();
    cfg.engine.max_num_seqs = 2;
    cfg.engine.max_waiting_seqs = 2;
    let w = Worker::start(cfg).await;
    let mut c = w.client().await;
    // Paused, nothing drains: the first request fills the 2 + 2 sequences of capacity.
    w.engine.set_paused(true);
    let req = |n: u32| pb::GenerateRequest {
        prompts: vec![tokens_prompt("a", &[1, 2, 3])],
        n,
        sampling: Some(sampling(0.0, 3, None)),
        return_text: false,
    };
    let mut first = c.generate(req(4)).await.unwrap().into_inner();
    let e = generate(&mut c, req(1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("capacity"), "{}", e.message());
    let (status, r) = post(
        &format!("{}/v1/completions", w.http_url),
        json!({"prompt": [1], "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 429, "{r}");
    // More than the whole capacity in one request can never fit: that is a bad request.
    let mut big = req(4);
    big.prompts.push(tokens_prompt("b", &[4]));
    assert_eq!(
        generate(&mut c, big).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    w.engine.set_paused(false);
    let g = first.message().await.unwrap().unwrap();
    assert_eq!(g.completions.len(), 4);
    assert!(first.message().await.unwrap().is_none());
    assert_eq!(generate(&mut c, req(2)).await.unwrap().len(), 1);
    let rejected = w
        .engine
        .metrics()
        .requests_rejected_total
        .with_label_values(&["overloaded"])
        .get();
    assert_eq!(rejected, 2);
    w.stop().await;
}
