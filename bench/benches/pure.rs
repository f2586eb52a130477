//! Criterion benchmarks of the pure parts behind the end-to-end rows: what one dispatch costs the
//! scheduler among 1,000 agents, what a heartbeat or an assignment costs to frame, what a
//! 10,000-file context manifest costs to name and check, and (page-cached I/O, for scale) to scan.
//! `bench/run.sh` runs them before the end-to-end bench, which prints their medians too.

use std::collections::BTreeMap;
use std::hint::black_box;

use coordinator::sched::{place, Candidate, Need, Placement};
use criterion::{criterion_group, criterion_main, Criterion};
use shared::context::ContextLimits;
use shared::proto::{AgentMsg, Assignment, CoordMsg, Emulation, Heartbeat, DEFAULT_MAX_FRAME};
use shared::Platform;

fn p(s: &str) -> Platform {
    s.parse().expect("a known platform")
}

fn scheduler(c: &mut Criterion) {
    let riscv = p("linux/riscv64");
    let natives = vec![riscv.clone()];
    let none: Vec<Platform> = vec![];
    let labels = BTreeMap::new();
    let require = BTreeMap::new();
    let names: Vec<String> = (0..1000).map(|i| format!("double-{i:04}")).collect();
    let fleet = |free_from: usize| -> Vec<Candidate<'_>> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| Candidate {
                name,
                native: &natives,
                emulated: &none,
                labels: &labels,
                allowed: &[],
                free: u32::from(i >= free_from),
                estimate: None,
            })
            .collect()
    };
    let need =
        Need { platform: &riscv, require: &require, emulation: Emulation::Fallback, entitlements: &[], warm: None };
    let all_free = fleet(0);
    let last_free = fleet(999);
    assert!(matches!(place(&need, all_free.iter().cloned()), Placement::Run { .. }));
    c.bench_function("sched/place among 1000 agents, all free", |b| {
        b.iter(|| place(black_box(&need), all_free.iter().cloned()))
    });
    c.bench_function("sched/place among 1000 agents, only the last free", |b| {
        b.iter(|| place(black_box(&need), last_free.iter().cloned()))
    });
}

fn framing(c: &mut Criterion) {
    let beat = AgentMsg::Heartbeat(Heartbeat { busy: 1 });
    c.bench_function("proto/encode a heartbeat", |b| {
        b.iter(|| shared::proto::encode(black_box(&beat), DEFAULT_MAX_FRAME).expect("encodes"))
    });
    let assign = CoordMsg::Assign(Box::new(Assignment {
        task: 4242,
        attempt: 1,
        build: "0123456789ab".into(),
        platform: p("linux/arm64"),
        emulated: false,
        repository: "registry.lan:5000/app".into(),
        context: shared::Digest::of(b"context"),
        dockerfile: "Dockerfile".into(),
        build_args: vec![("VERSION".into(), "1.2.3".into())],
        target: None,
        no_cache: false,
        insecure_registries: vec!["registry.lan:5000".into()],
        credentials: None,
        secrets: vec![],
        entitlements: vec![],
        context_limits: shared::context::ContextLimits::default().wire(),
        annotations: Default::default(),
        labels: vec![],
        ssh: vec![],
        inputs: Default::default(),
        cache_to: None,
        cache_from: vec![],
        cache_import: vec![],
    }));
    let wire = shared::proto::encode(&assign, DEFAULT_MAX_FRAME).expect("encodes");
    c.bench_function("proto/decode an assignment", |b| {
        b.iter(|| shared::proto::decode::<CoordMsg>(black_box(&wire[4..])).expect("decodes"))
    });
}

fn manifests(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").expect("write");
    for d in 0..100 {
        let sub = dir.path().join(format!("m{d:03}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..100 {
            std::fs::write(sub.join(format!("f{f:03}.txt")), format!("file {d} {f}\n").repeat(20)).expect("write");
        }
    }
    let scanned = shared::context::scan(dir.path(), "Dockerfile").expect("scans");
    let manifest = scanned.manifest.clone();
    c.bench_function("context/digest of a 10,000-file manifest", |b| b.iter(|| black_box(&manifest).digest()));
    c.bench_function("context/validate a 10,000-file manifest", |b| {
        b.iter(|| black_box(&manifest).validate(&ContextLimits::default()).expect("valid"))
    });
    let mut group = c.benchmark_group("context");
    group.sample_size(10);
    group.bench_function("scan 10,000 files (page-cached I/O)", |b| {
        b.iter(|| shared::context::scan(black_box(dir.path()), "Dockerfile").expect("scans"))
    });
    group.finish();
}

/// What building a registry client costs: why the coordinator keeps one per credentials
/// (`shared::registry::RegistryPool`) instead of one per submitted build and pushed index.
fn registry_client(c: &mut Criterion) {
    let insecure = vec!["127.0.0.1:5000".to_string()];
    c.bench_function("registry/client construction (once per credentials; pooled)", |b| {
        b.iter(|| shared::registry::Registry::new(black_box(&insecure), None))
    });
}

criterion_group!(benches, scheduler, framing, manifests, registry_client);
criterion_main!(benches);
