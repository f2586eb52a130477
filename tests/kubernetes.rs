//! deploy/kubernetes: the kustomize base validates against the Kubernetes schemas
//! (`kubernetes-validate --strict`, from PyPI; `deploy/install.sh --test-deps` installs it), and
//! says what it must: QUIC over a UDP Service, one agent DaemonSet per architecture pinned with
//! `kubernetes.io/arch`, and a reason written above every `privileged: true`.
//!
//! Debian 12 packages neither kustomize nor kubectl, so the base is rendered here the way
//! `kustomize build` renders it for this base: the files in `resources:`, in order, as one
//! multi-document stream (every resource names its namespace itself, so kustomize's `namespace:`
//! changes nothing; the `images:` rewrite is not applied, and `farm` is a valid image name). Where
//! `kubectl kustomize` is installed, its output is validated too.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::require_tool;

const KINDS: [(&str, &str); 7] = [
    ("namespace", "farm"),
    ("configmap", "farm-coordinator-config"),
    ("service", "farm-coordinator"),
    ("statefulset", "farm-coordinator"),
    ("daemonset", "farm-agent-amd64"),
    ("daemonset", "farm-agent-arm64"),
    ("daemonset", "farm-agent-arm"),
];

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The `resources:` list of kustomization.yaml, in order.
fn resources() -> Vec<String> {
    let text = read(&base().join("kustomization.yaml"));
    let mut lines = text.lines().skip_while(|l| l.trim_end() != "resources:").skip(1);
    let mut out = Vec::new();
    for line in lines.by_ref() {
        match line.trim_start().strip_prefix("- ") {
            Some(file) if line.starts_with(' ') => out.push(file.trim().to_string()),
            _ => break,
        }
    }
    assert!(!out.is_empty(), "kustomization.yaml lists no resources:");
    out
}

fn render() -> String {
    resources()
        .iter()
        .map(|file| {
            let text = read(&base().join(file));
            assert!(!text.contains("\n---"), "{file} holds several documents: one resource per file");
            format!("---\n{text}")
        })
        .collect()
}

/// Runs kubernetes-validate --strict on `file`; asserts it passed every resource of `KINDS` and
/// nothing else.
fn validate(file: &Path) {
    let out = Command::new("kubernetes-validate").arg("--strict").arg(file).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("kubernetes-validate --strict {}:\n{stdout}{stderr}", file.display());
    assert!(out.status.success(), "kubernetes-validate refused {}:\n{stdout}{stderr}", file.display());
    let passed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split(" passed for resource ").nth(1))
        .map(|rest| rest.split(' ').next().unwrap())
        .collect();
    let want: Vec<String> = KINDS.iter().map(|(kind, name)| format!("{kind}/{name}")).collect();
    let mut got: Vec<String> = passed.iter().map(|s| s.to_string()).collect();
    got.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got, want_sorted, "validated documents of {}", file.display());
    println!("validated {} documents", passed.len());
}

#[test]
fn kustomize_base_validates_against_the_kubernetes_schemas() {
    require_tool("kubernetes-validate");
    let tmp = tempfile::tempdir().unwrap();
    let rendered = tmp.path().join("farm.yaml");
    std::fs::write(&rendered, render()).unwrap();
    validate(&rendered);

    if Command::new("sh").args(["-c", "command -v kubectl"]).output().unwrap().status.success() {
        let out = Command::new("kubectl").arg("kustomize").arg(base()).output().unwrap();
        assert!(out.status.success(), "kubectl kustomize failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("image: registry.lan:5000/farm:0.1"), "images: rewrite not applied:\n{text}");
        let built = tmp.path().join("kustomize-build.yaml");
        std::fs::write(&built, text).unwrap();
        validate(&built);
    } else {
        println!("kubectl not installed: the kustomize build itself was not checked");
    }
}

#[test]
fn quic_is_served_over_a_udp_service() {
    let text = read(&base().join("coordinator-service.yaml"));
    assert!(text.contains("kind: Service\n"), "{text}");
    assert!(text.contains("  type: ClusterIP\n"), "{text}");
    assert!(
        text.contains("    - name: quic\n      protocol: UDP\n      port: 3276\n      targetPort: quic\n"),
        "the Service must carry port 3276 as UDP (QUIC):\n{text}"
    );
    let sts = read(&base().join("coordinator-statefulset.yaml"));
    assert!(
        sts.contains("            - name: quic\n              containerPort: 3276\n              protocol: UDP\n"),
        "{sts}"
    );
    assert!(sts.contains("prometheus.io/port: \"9376\""), "{sts}");
}

#[test]
fn one_agent_daemonset_per_architecture_pinned_by_node_selector() {
    let mut arches = Vec::new();
    for file in resources() {
        let text = read(&base().join(&file));
        if !text.contains("\nkind: DaemonSet\n") {
            continue;
        }
        let arch = file.strip_prefix("agent-").and_then(|f| f.strip_suffix(".yaml")).expect("agent-ARCH.yaml");
        assert!(
            text.contains(&format!("      nodeSelector:\n        kubernetes.io/arch: {arch}\n")),
            "{file} has no nodeSelector kubernetes.io/arch: {arch}"
        );
        assert!(text.contains("name: farm-join-token"), "{file} does not join with Secret farm-join-token");
        assert!(text.contains("exec farm agent join --name \"$FARM_NAME\""), "{file} does not join");
        arches.push(arch.to_string());
    }
    assert_eq!(arches, ["amd64", "arm64", "arm"]);
}

#[test]
fn every_privileged_container_says_why_above_it() {
    let mut found = 0;
    for file in resources() {
        let text = read(&base().join(&file));
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim() != "privileged: true" {
                continue;
            }
            found += 1;
            assert_eq!(
                lines[i - 1].trim(),
                "securityContext:",
                "{file}:{}: privileged outside a securityContext",
                i + 1
            );
            let comment: Vec<&str> =
                lines[..i - 1].iter().rev().take_while(|l| l.trim_start().starts_with('#')).copied().collect();
            let comment = comment.into_iter().rev().collect::<Vec<_>>().join("\n");
            for why in
                ["runc", "namespaces", "cgroup", "honest minimum", "--isolation chroot", "shares the pod's /proc"]
            {
                assert!(
                    comment.contains(why),
                    "{file}:{}: the comment above privileged: true does not say {why:?}:\n{comment}",
                    i + 1
                );
            }
        }
    }
    assert_eq!(found, 3, "one privileged agent container per architecture");
}
