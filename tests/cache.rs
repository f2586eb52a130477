//! End to end: no work repeated. The coordinator's result cache, the agents' layer cache, and
//! base image tags resolved to digests at build time.

mod common;

use std::process::Command;
use std::time::Instant;

use common::registry::Registry;
use common::*;

const PLATFORMS: &str = "linux/amd64,linux/arm64,linux/arm/v7";

#[test]
fn no_op_rebuilds_are_cached_changed_files_reuse_layers_and_moved_bases_miss() {
    require_tool("skopeo");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    farm.agent("x86", &["--capacity", "3"]);
    let ctx = example("hello", farm.tmp.path());
    let args = |tag: &str| {
        let mut a = farm.client_args();
        a.extend(registry.build_flags(&base, PLATFORMS, tag, &ctx));
        a
    };
    let (ok, out, err) = build(&args("hello:1"));
    assert!(ok, "{out}\n{err}");
    assert!(summary(&out).values().all(|(_, mode)| mode != "cached"));
    let assigned = || farm.agents["x86"].log().matches("task assigned").count();
    let before = assigned();

    // Nothing changed: every platform is answered from the cache, no buildah runs, same manifests.
    let start = Instant::now();
    let (ok, out2, err) = build(&args("hello:2"));
    let took = start.elapsed();
    assert!(ok, "{out2}\n{err}");
    let rows = summary(&out2);
    assert_eq!(rows.len(), 3);
    assert!(rows.values().all(|(_, mode)| mode == "cached"), "{out2}");
    assert_eq!(assigned(), before, "no task may reach an agent");
    let digests = |o: &str| -> Vec<String> {
        o.lines()
            .skip_while(|l| !l.starts_with("PLATFORM"))
            .skip(1)
            .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
            .collect()
    };
    assert_eq!(digests(&out), digests(&out2));
    eprintln!("no-op rebuild of three platforms took {took:?}");

    // --no-cache bypasses it.
    let mut nc = args("hello:3");
    nc.push("--no-cache".into());
    let (ok, out, err) = build(&nc);
    assert!(ok, "{out}\n{err}");
    assert!(summary(&out).values().all(|(_, mode)| mode != "cached"), "{out}");

    // One file changed: built again, and buildah reuses the layers before the change.
    std::fs::write(ctx.join("hello.sh"), "#!/bin/sh\necho changed\n").unwrap();
    let (ok, out, err) = build(&args("hello:4"));
    assert!(ok, "{out}\n{err}");
    assert!(summary(&out).values().all(|(_, mode)| mode != "cached"), "{out}");
    for p in ["linux/amd64", "linux/arm64", "linux/arm/v7"] {
        assert!(
            err.lines().any(|l| l.starts_with(&format!("[{p}] --> Using cache"))),
            "no layer reused for {p}:\n{err}"
        );
    }

    // Unchanged again: cached. Then the base tag moves: the next build misses the cache.
    let (ok, out, err) = build(&args("hello:5"));
    assert!(ok, "{out}\n{err}");
    assert!(summary(&out).values().all(|(_, mode)| mode == "cached"), "{out}");
    let st = Command::new("skopeo")
        .args(["copy", "--all", "--src-tls-verify=false", "--dest-tls-verify=false"])
        .arg(format!("docker://{}/hello:1", registry.addr))
        .arg(format!("docker://{base}"))
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    let (ok, out, err) = build(&args("hello:6"));
    assert!(ok, "{out}\n{err}");
    assert!(summary(&out).values().all(|(_, mode)| mode != "cached"), "a moved base must miss the cache: {out}");
}
