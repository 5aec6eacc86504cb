//! deploy/ checked offline, as CI can: every kustomize overlay renders (`kubectl
//! kustomize`) and each object validates strictly against the Kubernetes schemas
//! (`kubernetes-validate --strict` from the project's venv, schemas bundled); the
//! alert rules pass `promtool check rules` and their unit tests (`promtool test
//! rules`); the PrometheusRule agrees with the plain rule file; the dashboard and the
//! Dockerfile hold what docs/operations.md says. kubectl comes with these machines,
//! promtool from Debian's prometheus package (scripts/setup.sh installs it), and
//! kubernetes-validate from scripts/requirements.txt: a missing tool fails the test
//! with a message saying how to get it.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

/// The tool's path, or a panic saying how to install it.
fn tool(name: &str, how: &str) -> PathBuf {
    let venv = root().join(".venv/bin").join(name);
    if venv.exists() {
        return venv;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| panic!("`{name}` is not installed: {how}"))
}

fn kubectl() -> PathBuf {
    tool(
        "kubectl",
        "install kubectl (it provides `kubectl kustomize`)",
    )
}

fn promtool() -> PathBuf {
    tool(
        "promtool",
        "run scripts/setup.sh (it installs Debian's prometheus package)",
    )
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const OVERLAYS: [&str; 3] = ["single-node", "multi-node", "pod-per-rank"];

fn render(dir: &Path) -> String {
    let (ok, out) = run(Command::new(kubectl()).arg("kustomize").arg(dir));
    assert!(ok, "kubectl kustomize {}:\n{out}", dir.display());
    out
}

/// `kubernetes-validate --strict` on `yaml`; returns (passed, output).
fn validate(yaml: &str, name: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("grpo-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let validator = tool(
        "kubernetes-validate",
        "run scripts/setup.sh (kubernetes-validate is in scripts/requirements.txt)",
    );
    let r = run(Command::new(validator).arg("--strict").arg(&file));
    let _ = std::fs::remove_file(&file);
    r
}

/// Python of the venv, for YAML parsing of the rendered objects.
fn python(code: &str, stdin: &str) -> String {
    use std::io::Write;
    let py = root().join(".venv/bin/python");
    let mut child = Command::new(&py)
        .args(["-c", code])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", py.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_overlay_renders_and_validates_strictly() {
    for overlay in OVERLAYS {
        let yaml = render(&deploy().join("overlays").join(overlay));
        let (ok, out) = validate(&yaml, overlay);
        assert!(ok, "{overlay} does not validate:\n{out}");
        // Every built-in object was checked against its schema (only the Prometheus
        // Operator's CRDs have no bundled schema).
        let passed = out.matches(" passed for resource ").count();
        assert!(
            passed >= 7,
            "{overlay}: only {passed} objects validated:\n{out}"
        );
        for line in out.lines().filter(|l| l.contains("Couldn't find schema")) {
            assert!(line.contains("monitoring.coreos.com"), "{overlay}: {line}");
        }
    }
    // The validation is strict: an unknown field fails it.
    let yaml = render(&deploy().join("overlays/single-node"));
    let broken = yaml.replacen(
        "completionMode: Indexed",
        "completionMode: Indexed\n  complet1ons: 3",
        1,
    );
    assert_ne!(broken, yaml);
    let (ok, out) = validate(&broken, "broken");
    assert!(!ok, "an unknown field passed:\n{out}");
}

/// (overlay, Job completions, trainer env that must be there, env that must not)
type Layout<'a> = (&'a str, u64, &'a [(&'a str, &'a str)], &'a [&'a str]);

#[test]
fn overlays_describe_the_documented_layouts() {
    let expect: [Layout; 3] = [
        (
            "single-node",
            1,
            &[("NNODES", "1"), ("NPROC_PER_NODE", "4")],
            &["WORLD_SIZE", "RANK"],
        ),
        (
            "multi-node",
            2,
            &[("NNODES", "2"), ("NPROC_PER_NODE", "8")],
            &["WORLD_SIZE", "RANK"],
        ),
        (
            "pod-per-rank",
            8,
            &[("WORLD_SIZE", "8")],
            &[
                "NNODES",
                "NPROC_PER_NODE",
                "NODE_RANK",
                "RANK",
                "LOCAL_RANK",
            ],
        ),
    ];
    let summary = r#"
import sys, yaml, json
out = {}
for d in yaml.safe_load_all(sys.stdin):
    if not d: continue
    out.setdefault(d["kind"], []).append(d)
job = out["Job"][0]["spec"]
pod = job["template"]["spec"]
c = pod["containers"][0]
sts = out["StatefulSet"][0]["spec"]["template"]["spec"]
w = sts["containers"][0]
gpus = c["resources"]["limits"]["nvidia.com/gpu"]
print(json.dumps({
  "completions": job["completions"], "parallelism": job["parallelism"],
  "mode": job["completionMode"], "subdomain": pod["subdomain"],
  "env": {e["name"]: e.get("value") for e in c["env"]},
  "secret": [e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] + w["env"] if e["name"] == "ROLLOUT_API_KEY"],
  "shm": [v for v in pod["volumes"] if v["name"] == "dshm"][0]["emptyDir"]["medium"],
  "grace": pod["terminationGracePeriodSeconds"],
  "policy": [r["onExitCodes"]["values"] for r in job["podFailurePolicy"]["rules"] if "onExitCodes" in r],
  "metrics_ports": len([p for p in c["ports"] if p["name"].startswith("metrics")]),
  "gpus": int(gpus),
  "probes": [k for k in ("startupProbe", "readinessProbe", "livenessProbe") if w[k]["httpGet"]["path"] == "/health"],
  "headless": sorted(s["metadata"]["name"] for s in out["Service"] if s["spec"].get("clusterIP") == "None"),
  "pdb": out["PodDisruptionBudget"][0]["spec"]["maxUnavailable"],
  "pvc": out["PersistentVolumeClaim"][0]["spec"]["accessModes"],
  "monitors": sorted(m["metadata"]["name"] for m in out["PodMonitor"]),
  "rules": len(out["PrometheusRule"]),
  "config": [d["data"]["grpo.yaml"] for d in out["ConfigMap"] if "grpo.yaml" in d.get("data", {})][0],
}))
"#;
    for (overlay, completions, has, lacks) in expect {
        let yaml = render(&deploy().join("overlays").join(overlay));
        let s: serde_json::Value = serde_json::from_str(&python(summary, &yaml)).unwrap();
        let ctx = format!("{overlay}: {s}");
        assert_eq!(s["completions"], completions, "{ctx}");
        assert_eq!(s["parallelism"], completions, "{ctx}");
        assert_eq!(s["mode"], "Indexed", "{ctx}");
        assert_eq!(s["subdomain"], "grpo-trainer", "{ctx}");
        for (k, v) in has {
            assert_eq!(s["env"][k], *v, "{ctx}");
        }
        for k in lacks {
            assert!(s["env"].get(k).is_none(), "{k} is set: {ctx}");
        }
        assert_eq!(
            s["env"]["MASTER_ADDR"], "grpo-trainer-0.grpo-trainer",
            "{ctx}"
        );
        assert_eq!(
            s["secret"],
            serde_json::json!(["grpo-rollout-api-key", "grpo-rollout-api-key"]),
            "{ctx}"
        );
        assert_eq!(s["shm"], "Memory", "{ctx}");
        assert_eq!(s["grace"], 900, "{ctx}");
        assert_eq!(s["policy"], serde_json::json!([[143]]), "{ctx}");
        assert_eq!(
            s["probes"],
            serde_json::json!(["startupProbe", "readinessProbe", "livenessProbe"]),
            "{ctx}"
        );
        assert_eq!(
            s["headless"],
            serde_json::json!(["grpo-rollout-worker", "grpo-trainer"]),
            "{ctx}"
        );
        assert_eq!(s["pdb"], 1, "{ctx}");
        assert_eq!(
            s["monitors"],
            serde_json::json!(["grpo-rollout-worker", "grpo-trainer"]),
            "{ctx}"
        );
        assert_eq!(s["rules"], 1, "{ctx}");
        // One metrics port and one GPU per rank of a pod.
        let per_pod = match overlay {
            "single-node" => 4,
            "multi-node" => 8,
            _ => 1,
        };
        assert_eq!(s["metrics_ports"], per_pod, "{ctx}");
        assert_eq!(s["gpus"], per_pod, "{ctx}");
        let config = s["config"].as_str().unwrap();
        for want in [
            "resume_from_checkpoint: latest",
            "sigterm_exit_code: 143",
            "dns:///grpo-rollout-worker:50051",
            "metrics_port: 9400",
        ] {
            assert!(
                config.contains(want),
                "{overlay}: config lacks {want}: {config}"
            );
        }
    }
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = deploy().join("components/monitoring");
    let (ok, out) = run(Command::new(promtool())
        .args(["check", "rules", "alerts.yaml"])
        .current_dir(&dir));
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 7 rules found"), "{out}");
    let (ok, out) = run(Command::new(promtool())
        .args(["test", "rules", "alerts_test.yaml"])
        .current_dir(&dir));
    assert!(ok, "promtool test rules:\n{out}");
    // The tests can fail: a rule with a raised threshold breaks them.
    let tmp = std::env::temp_dir().join(format!("grpo-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let rules = std::fs::read_to_string(dir.join("alerts.yaml")).unwrap();
    std::fs::write(
        tmp.join("alerts.yaml"),
        rules.replace(
            "vllm:kv_cache_usage_perc) > 0.95",
            "vllm:kv_cache_usage_perc) > 0.99",
        ),
    )
    .unwrap();
    std::fs::copy(dir.join("alerts_test.yaml"), tmp.join("alerts_test.yaml")).unwrap();
    let (ok, out) = run(Command::new(promtool())
        .args(["test", "rules", "alerts_test.yaml"])
        .current_dir(&tmp));
    assert!(!ok && out.contains("GrpoKvCacheSaturated"), "{out}");
    let _ = std::fs::remove_dir_all(&tmp);
    // The operator's copy is generated from the same file.
    let (ok, out) = run(Command::new(root().join(".venv/bin/python"))
        .arg(dir.join("make_prometheusrule.py"))
        .arg("--check"));
    assert!(ok, "{out}");
}

#[test]
fn dashboard_covers_the_trainer_and_the_workers() {
    let text =
        std::fs::read_to_string(deploy().join("components/monitoring/dashboard.json")).unwrap();
    let exprs = python(
        "import sys, json\nd = json.load(sys.stdin)\n\
         print('\\n'.join(t['expr'] for p in d['panels'] for t in p.get('targets', [])))",
        &text,
    );
    for want in [
        "trainer_reward",
        "trainer_rewards_.+_mean",
        "trainer_kl",
        "trainer_clip_ratio_low_mean",
        "trainer_entropy",
        "trainer_completions_mean_length",
        "trainer_phase_duration_seconds_sum",
        "trainer_tokens_per_second_generation",
        "trainer_weight_version",
        "trainer_worker_weight_version",
        "trainer_worker_healthy",
        "trainer_last_step_timestamp_seconds",
        "vllm:num_requests_running{model_name=~\"$model_name\"",
        "vllm:kv_cache_usage_perc{model_name=~\"$model_name\"",
        "vllm:time_to_first_token_seconds_bucket",
        "rollout_weight_version",
    ] {
        assert!(exprs.contains(want), "no panel queries {want}");
    }
    // Every vLLM-named query filters on model_name, as vLLM's dashboards do.
    for e in exprs.lines().filter(|e| e.contains("vllm:")) {
        assert!(e.contains("model_name=~\"$model_name\""), "{e}");
    }
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_copies_what_exists() {
    let text = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(stages[0].ends_with(" AS build") && stages[1].ends_with(" AS runtime"));
    let runtime = &text[text.find(stages[1]).unwrap()..];
    // No compiler or build tool in the image that runs.
    for tool in ["gcc", "g++", "clang", "build-essential", "cargo", "rustc"] {
        assert!(
            !runtime.contains(&format!("install -y --no-install-recommends {tool}"))
                && !runtime.contains(&format!(" {tool} ")),
            "runtime stage mentions {tool}"
        );
    }
    let user = runtime
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("a USER line in the runtime stage");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
    assert!(
        text.contains("bash scripts/setup.sh"),
        "builds with the project's setup"
    );
    assert!(text.contains("${SITE}/nvidia") && text.contains("${SITE}/torch/lib"));
    // Files copied from the build context exist and are not excluded by .dockerignore.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let src = line.split_whitespace().nth(1).unwrap();
        if src == "." {
            continue;
        }
        assert!(root().join(src).exists(), "{line}: {src} does not exist");
        let top = src.split('/').next().unwrap();
        assert!(
            !ignore.lines().any(|p| p.trim_end_matches('/') == top),
            "{src} is excluded by .dockerignore"
        );
    }
    // What setup.sh and cargo need stays in the context.
    for needed in [
        "scripts",
        "Cargo.lock",
        "build",
        "proto",
        "model",
        "trainer",
        "rollout-worker",
    ] {
        assert!(
            !ignore.lines().any(|p| p.trim_end_matches('/') == needed),
            "{needed} is excluded by .dockerignore"
        );
    }
    for excluded in ["target/", ".libtorch", ".venv"] {
        assert!(
            ignore.lines().any(|p| p == excluded),
            ".dockerignore lacks {excluded}"
        );
    }
}
