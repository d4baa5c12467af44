//! The deployment files under `deploy/` agree with each other and with how `resnet-train` picks
//! its role: the Indexed Job's size, the headless Service, the `{rank}` dial template, the
//! completion-index RANK, the token Secret, GPUs, volumes and the command line
//! (`deploy/k8s/resnet-train.yaml`, and `deploy/k8s/jobset.yaml` when present), and the
//! Dockerfile's runtime stage. No cluster or container engine is involved: the manifests are
//! parsed as YAML and their fields cross-checked.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;

/// The repository's `deploy/` directory.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every non-empty document of a multi-document YAML file.
fn documents(text: &str, what: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: invalid YAML: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The value at a dotted path of mapping keys (`spec.template.spec`), if every step exists.
fn get<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(value, |v, key| v.get(key))
}

fn req<'a>(value: &'a Value, path: &str, what: &str) -> &'a Value {
    get(value, path).unwrap_or_else(|| panic!("{what}: `{path}` is missing"))
}

fn req_str<'a>(value: &'a Value, path: &str, what: &str) -> &'a str {
    req(value, path, what)
        .as_str()
        .unwrap_or_else(|| panic!("{what}: `{path}` must be a string"))
}

fn req_u64(value: &Value, path: &str, what: &str) -> u64 {
    req(value, path, what)
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: `{path}` must be a non-negative integer"))
}

fn req_seq<'a>(value: &'a Value, path: &str, what: &str) -> &'a [Value] {
    req(value, path, what)
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: `{path}` must be a list"))
}

/// A quantity (`1`, `"1"`) as an integer.
fn quantity(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// The single document of this kind.
fn single<'a>(docs: &'a [Value], kind: &str, what: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{what}: expected exactly one {kind}, found {}",
        found.len()
    );
    found[0]
}

/// The container's `env` entry of this name.
fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    req_seq(container, "env", "container")
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
        .unwrap_or_else(|| panic!("container: no env var {name}"))
}

/// A plain `value:` env var.
fn env_value<'a>(container: &'a Value, name: &str) -> &'a str {
    req_str(env(container, name), "value", &format!("env {name}"))
}

/// `ws://HOST:PORT` split into host and port.
fn ws_host_port(url: &str) -> (&str, u64) {
    let rest = url
        .strip_prefix("ws://")
        .unwrap_or_else(|| panic!("{url:?} must start with ws://"));
    let (host, port) = rest
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{url:?} must name a port"));
    let port = port
        .parse()
        .unwrap_or_else(|e| panic!("{url:?}: port {port:?} is not a number: {e}"));
    (host, port)
}

/// `host` is `short` or `short.<more domain labels>` (e.g. `.my-ns.svc.cluster.local`).
fn host_is(host: &str, short: &str) -> bool {
    host == short
        || host
            .strip_prefix(short)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// The value after `flag` in an argument list.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).map(String::as_str)
}

/// What a pod template has to satisfy, the same for the Job and the JobSet.
struct Expect<'a> {
    what: &'a str,
    /// Ranks 1.. are dialed at `ws://{host_prefix}{rank}.{subdomain}:{port}`.
    host_prefix: String,
    subdomain: &'a str,
}

/// Checks the Indexed Job spec (`completionMode` ... `template`) and its pod template; returns
/// the pod port the workers listen on.
fn check_indexed_job(
    job_spec: &Value,
    expect: &Expect,
    manifest_text: &str,
    docs: &[Value],
) -> u64 {
    let what = expect.what;
    assert_eq!(
        req_str(job_spec, "completionMode", what),
        "Indexed",
        "{what}: RANK comes from the completion index, so the Job must be Indexed"
    );
    let completions = req_u64(job_spec, "completions", what);
    let parallelism = req_u64(job_spec, "parallelism", what);
    assert_eq!(
        completions, parallelism,
        "{what}: completions and parallelism must be equal (every rank runs at once)"
    );
    assert_eq!(
        req_u64(job_spec, "backoffLimit", what),
        0,
        "{what}: backoffLimit must be 0 (a replaced pod cannot rejoin a running group)"
    );
    if let Some(policy) = get(job_spec, "successPolicy") {
        let rules = req_seq(policy, "rules", what);
        assert!(
            rules
                .iter()
                .any(|r| r.get("succeededIndexes").and_then(Value::as_str) == Some("0")),
            "{what}: successPolicy must have a rule succeededIndexes: \"0\" (a string: the API \
             rejects a number)"
        );
    }

    let pod = req(job_spec, "template.spec", what);
    assert_eq!(
        req_str(pod, "restartPolicy", what),
        "Never",
        "{what}: restartPolicy must be Never (a restarted container cannot rejoin the group)"
    );
    let containers = req_seq(pod, "containers", what);
    assert_eq!(containers.len(), 1, "{what}: expected one container");
    let c = &containers[0];

    // The command line: resnet-train with --data and --out, both on mounted volumes.
    let argv: Vec<String> = ["command", "args"]
        .iter()
        .filter_map(|k| c.get(*k))
        .flat_map(|v| {
            v.as_sequence()
                .unwrap_or_else(|| panic!("{what}: command/args must be lists"))
                .iter()
                .map(|a| match a {
                    Value::String(s) => s.clone(),
                    other => panic!("{what}: argument {other:?} must be a string (quote numbers)"),
                })
        })
        .collect();
    assert_eq!(
        argv.first().map(String::as_str),
        Some("resnet-train"),
        "{what}: the command must start with resnet-train, got {argv:?}"
    );
    let mounts: Vec<(&str, &str)> = req_seq(c, "volumeMounts", what)
        .iter()
        .map(|m| (req_str(m, "name", what), req_str(m, "mountPath", what)))
        .collect();
    let volumes = req_seq(pod, "volumes", what);
    for (name, _) in &mounts {
        let volume = volumes
            .iter()
            .find(|v| v.get("name").and_then(Value::as_str) == Some(*name))
            .unwrap_or_else(|| panic!("{what}: volumeMount {name} has no volume"));
        if let Some(claim) = get(volume, "persistentVolumeClaim") {
            assert!(
                !req_str(claim, "claimName", what).is_empty(),
                "{what}: volume {name}: empty claimName"
            );
        }
    }
    for flag in ["--data", "--out"] {
        let path = flag_value(&argv, flag)
            .unwrap_or_else(|| panic!("{what}: the command needs {flag} PATH, got {argv:?}"));
        assert!(
            mounts.iter().any(|(_, m)| Path::new(path).starts_with(m)),
            "{what}: {flag} {path} is on no volumeMount ({mounts:?})"
        );
    }

    // GPUs: a limit (extended resources cannot be overcommitted: a request must equal it).
    let gpus = get(c, "resources.limits")
        .and_then(|l| l.get("nvidia.com/gpu"))
        .and_then(quantity)
        .unwrap_or_else(|| panic!("{what}: resources.limits.\"nvidia.com/gpu\" must be set"));
    assert!(gpus >= 1, "{what}: at least one GPU per pod");
    if let Some(request) = get(c, "resources.requests").and_then(|r| r.get("nvidia.com/gpu")) {
        assert_eq!(
            quantity(request),
            Some(gpus),
            "{what}: GPU request must equal the limit"
        );
    }
    // Rank 0 splits the global batch evenly over every GPU of every rank.
    if let Some(batch) = flag_value(&argv, "--batch-size") {
        let batch: u64 = batch
            .parse()
            .unwrap_or_else(|e| panic!("{what}: --batch-size {batch}: {e}"));
        assert_eq!(
            batch % (completions * gpus),
            0,
            "{what}: --batch-size {batch} must split evenly over {} GPUs",
            completions * gpus
        );
    }

    // The rank and the group.
    let rank_from = req_str(env(c, "RANK"), "valueFrom.fieldRef.fieldPath", "env RANK");
    assert!(
        [
            "metadata.annotations['batch.kubernetes.io/job-completion-index']",
            "metadata.labels['batch.kubernetes.io/job-completion-index']",
        ]
        .contains(&rank_from),
        "{what}: RANK must come from the pod's completion index, not {rank_from:?}"
    );
    let world: u64 = env_value(c, "WORLD_SIZE")
        .parse()
        .unwrap_or_else(|e| panic!("{what}: WORLD_SIZE: {e}"));
    assert_eq!(
        world, completions,
        "{what}: WORLD_SIZE must equal completions (one pod per rank)"
    );
    let master_port: u64 = env_value(c, "MASTER_PORT")
        .parse()
        .unwrap_or_else(|e| panic!("{what}: MASTER_PORT: {e}"));
    let container_port = req_seq(c, "ports", what)
        .iter()
        .find_map(|p| p.get("containerPort").and_then(Value::as_u64))
        .unwrap_or_else(|| panic!("{what}: the container must declare its containerPort"));
    assert_eq!(
        master_port, container_port,
        "{what}: MASTER_PORT vs containerPort"
    );

    let template = env_value(c, "RESNET_REMOTE_TEMPLATE");
    let (host, port) = ws_host_port(template);
    let want_host = format!("{}{{rank}}.{}", expect.host_prefix, expect.subdomain);
    assert!(
        host_is(host, &want_host),
        "{what}: RESNET_REMOTE_TEMPLATE {template:?}: rank hosts are {want_host}"
    );
    assert_eq!(
        port, master_port,
        "{what}: RESNET_REMOTE_TEMPLATE port vs MASTER_PORT"
    );
    let master_addr = env_value(c, "MASTER_ADDR");
    let want_master = format!("{}0.{}", expect.host_prefix, expect.subdomain);
    assert!(
        host_is(master_addr, &want_master),
        "{what}: MASTER_ADDR must be {want_master}"
    );

    // The token: from a Secret, which this file either defines or tells how to create.
    let token = req(
        env(c, "RESNET_REMOTE_TOKEN"),
        "valueFrom.secretKeyRef",
        "env RESNET_REMOTE_TOKEN",
    );
    let secret_name = req_str(token, "name", "RESNET_REMOTE_TOKEN secretKeyRef");
    let secret_key = req_str(token, "key", "RESNET_REMOTE_TOKEN secretKeyRef");
    let secret = docs.iter().find(|d| {
        d.get("kind").and_then(Value::as_str) == Some("Secret")
            && get(d, "metadata.name").and_then(Value::as_str) == Some(secret_name)
    });
    match secret {
        Some(secret) => assert!(
            ["stringData", "data"]
                .iter()
                .any(|k| get(secret, k).and_then(|m| m.get(secret_key)).is_some()),
            "{what}: Secret {secret_name} has no key {secret_key}"
        ),
        None => {
            let how =
                format!("kubectl create secret generic {secret_name} --from-literal={secret_key}=");
            assert!(
                manifest_text.contains(&how),
                "{what}: Secret {secret_name} is neither defined here nor created by a `{how}...` \
                 instruction"
            );
        }
    }
    container_port
}

#[test]
fn indexed_job_service_and_secret_agree() {
    let path = deploy_dir().join("k8s/resnet-train.yaml");
    let text = read(&path);
    let docs = documents(&text, "resnet-train.yaml");
    for doc in &docs {
        for key in ["apiVersion", "kind", "metadata.name"] {
            req_str(doc, key, "every document");
        }
    }

    let job = single(&docs, "Job", "resnet-train.yaml");
    assert_eq!(req_str(job, "apiVersion", "Job"), "batch/v1");
    let job_name = req_str(job, "metadata.name", "Job");
    let service = single(&docs, "Service", "resnet-train.yaml");
    let service_name = req_str(service, "metadata.name", "Service");

    // Pod DNS names <job>-<index>.<service> need the subdomain to name a headless Service that
    // selects the Job's pods.
    let pod_template = req(job, "spec.template", "Job");
    assert_eq!(
        req_str(pod_template, "spec.subdomain", "Job pod template"),
        service_name,
        "the pods' subdomain must be the headless Service's name"
    );
    assert_eq!(
        req_str(service, "spec.clusterIP", "Service"),
        "None",
        "the Service must be headless (clusterIP: None)"
    );
    let selector = req(service, "spec.selector", "Service")
        .as_mapping()
        .expect("Service: spec.selector must be a mapping");
    assert!(!selector.is_empty(), "Service: empty selector");
    let pod_labels = get(pod_template, "metadata.labels").and_then(Value::as_mapping);
    for (key, value) in selector {
        let key = key.as_str().expect("Service: selector keys are strings");
        let value = value
            .as_str()
            .expect("Service: selector values are strings");
        // The Job controller sets these two labels to the Job's name on every pod.
        let matches = if key == "batch.kubernetes.io/job-name" || key == "job-name" {
            value == job_name
        } else {
            pod_labels.and_then(|l| l.get(key)).and_then(Value::as_str) == Some(value)
        };
        assert!(
            matches,
            "Service selector {key}={value} does not match the Job's pods"
        );
    }

    let expect = Expect {
        what: "Job",
        host_prefix: format!("{job_name}-"),
        subdomain: service_name,
    };
    let container_port = check_indexed_job(req(job, "spec", "Job"), &expect, &text, &docs);

    let ports = req_seq(service, "spec.ports", "Service");
    let remote = ports
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some("remote"))
        .expect("Service: a port named `remote`");
    assert_eq!(
        req_u64(remote, "port", "Service port"),
        container_port,
        "Service port vs MASTER_PORT"
    );
    if let Some(target) = remote.get("targetPort") {
        assert!(
            target.as_u64() == Some(container_port) || target.as_str() == Some("remote"),
            "Service targetPort {target:?} must be the container's port"
        );
    }
}

#[test]
fn jobset_variant_agrees_when_present() {
    let path = deploy_dir().join("k8s/jobset.yaml");
    if !path.exists() {
        return;
    }
    let text = read(&path);
    let docs = documents(&text, "jobset.yaml");
    let jobset = single(&docs, "JobSet", "jobset.yaml");
    assert_eq!(
        req_str(jobset, "apiVersion", "JobSet"),
        "jobset.x-k8s.io/v1alpha2"
    );
    let name = req_str(jobset, "metadata.name", "JobSet");
    assert_eq!(
        get(jobset, "spec.network.enableDNSHostnames").and_then(Value::as_bool),
        Some(true),
        "JobSet: spec.network.enableDNSHostnames must be true (ranks dial each other by name)"
    );
    let subdomain = get(jobset, "spec.network.subdomain")
        .and_then(Value::as_str)
        .unwrap_or(name);
    let replicated = req_seq(jobset, "spec.replicatedJobs", "JobSet");
    assert_eq!(
        replicated.len(),
        1,
        "JobSet: one replicatedJob, every rank from one template"
    );
    let rj = &replicated[0];
    let rj_name = req_str(rj, "name", "replicatedJob");
    if let Some(replicas) = rj.get("replicas") {
        assert_eq!(
            replicas.as_u64(),
            Some(1),
            "replicatedJob: replicas must be 1"
        );
    }
    let job_spec = req(rj, "template.spec", "replicatedJob");
    // JobSet names the child Job <jobset>-<replicatedJob>-<jobIndex>.
    let expect = Expect {
        what: "JobSet",
        host_prefix: format!("{name}-{rj_name}-0-"),
        subdomain,
    };
    check_indexed_job(job_spec, &expect, &text, &docs);
}

#[test]
fn dockerfile_runtime_stage_runs_resnet_train() {
    let text = read(&deploy_dir().join("Dockerfile"));
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let stages: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.to_ascii_uppercase().starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert!(
        stages.len() >= 2,
        "Dockerfile: expected a builder and a runtime stage"
    );
    let build = lines[..stages[stages.len() - 1]].join("\n");
    assert!(
        build.contains("cargo build")
            && build.contains("--release")
            && build.contains("--locked")
            && build.contains("-p resnet-train"),
        "Dockerfile: the builder must run `cargo build --release --locked -p resnet-train`"
    );
    let runtime = &lines[stages[stages.len() - 1]..];
    let copy = runtime
        .iter()
        .find(|l| l.starts_with("COPY --from=") && l.ends_with(" /usr/local/bin/resnet-train"))
        .expect(
            "Dockerfile: the runtime stage must copy the binary to /usr/local/bin/resnet-train",
        );
    let words: Vec<&str> = copy.split_whitespace().collect();
    let source = words[words.len() - 2];
    assert!(
        source.ends_with("/resnet-train") && build.contains(source),
        "Dockerfile: the runtime stage copies {source}, which the builder never writes"
    );
    assert!(
        build.contains("target/release/resnet-train"),
        "Dockerfile: the builder must take the binary from target/release/resnet-train"
    );
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT") && l.contains("resnet-train")),
        "Dockerfile: the runtime stage needs ENTRYPOINT resnet-train"
    );
    assert!(
        runtime
            .iter()
            .any(|l| l.starts_with("USER ") && !l.contains("root") && !l.contains(" 0")),
        "Dockerfile: the runtime stage must switch to a non-root USER"
    );
    let ignore = read(&deploy_dir().join("Dockerfile.dockerignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "target"),
        "Dockerfile.dockerignore must keep target/ out of the build context"
    );
}
