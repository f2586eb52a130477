//! End to end: the layer cache shared through the registry. Two agents of the same platform;
//! the first builds a context and exports each step's layers under the coordinator's
//! `cache_repo` (per platform); one file changes, the first agent goes away, and the second,
//! which never built this context, rebuilds it taking the unchanged steps from the registry.
//! The registry then holds the user's tags, the base, and the cache repository, nothing else.
//! `--cache-to` / `--cache-from` name another cache per build, as buildx spells them.

mod common;

use common::registry::{read_image, Registry};
use common::*;

// `ARG N` inside the stage: buildah 1.28 never pulls such a step from the registry, so the cold
// agent imports it before building (the coordinator names it); the RUN steps it pulls lazily.
const DOCKERFILE: &str = "ARG BASE\nFROM $BASE\nARG N=1\nRUN echo one > /one\nRUN echo two > /two\n\
                          RUN cat /one /two > /both\nCOPY data.txt /data.txt\n";

#[test]
fn a_cold_agent_reuses_the_layers_another_agent_exported_to_the_registry() {
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    let config = farm.tmp.path().join("coordinator.toml");
    std::fs::write(&config, format!("cache_repo = \"{}/farm-cache\"\n", registry.addr)).unwrap();
    farm.restart_coordinator_env(&[("FARM_CONFIG", config.to_str().unwrap())]);
    let ctx = farm.tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE).unwrap();
    std::fs::write(ctx.join("data.txt"), "first\n").unwrap();
    let client = farm.client_args();
    let args = |tag: &str, extra: &[&str]| {
        let mut a = client.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(registry.build_flags(&base, "linux/amd64", tag, &ctx));
        a
    };

    // Refused before anything is sent: a cache type farm's agents cannot share.
    let (ok, _, err) = build(&args("app:0", &["--cache-to", "type=local,dest=/tmp/cache"]));
    assert!(!ok);
    assert!(
        err.contains(
            "--cache-to type=local,dest=/tmp/cache: type=local: farm's agents share their layer cache only through a \
             registry (each keeps its own between builds); use --cache-to \
             type=registry,ref=REGISTRY/REPOSITORY[:TAG][,mode=max]"
        ),
        "{err}"
    );

    farm.agent("x86a", &["--emulated", "none"]);
    let (ok, out, err) = build(&args("app:1", &[]));
    assert!(ok, "{out}\n{err}");
    assert_eq!(summary(&out)["linux/amd64"].0, "x86a", "{out}");
    assert_eq!(err.matches("[linux/amd64] --> Pushing cache").count(), 5, "{err}");
    let cache_tags = registry.tags("farm-cache/linux-amd64");
    assert_eq!(cache_tags.len(), 5, "one cache image per step: {cache_tags:?}");

    // One file changes; the first agent goes away; a second one, which never built this
    // context, takes the build.
    std::fs::write(ctx.join("data.txt"), "second\n").unwrap();
    farm.agents.get_mut("x86a").unwrap().kill();
    farm.wait_agent("x86a", "offline");
    farm.agent("x86b", &["--emulated", "none"]);
    let (ok, out, err) = build(&args("app:2", &[]));
    assert!(ok, "{out}\n{err}");
    assert_eq!(summary(&out)["linux/amd64"].0, "x86b", "{out}");
    // buildah 1.28 pulls no ARG step by key: the cold store imports the one the first build
    // exported (the coordinator names it, see shared::cache::StepLog), then buildah pulls each
    // unchanged RUN step from the registry as it reaches it.
    let imported = format!(
        "[linux/amd64] farm: imported the layer cache {}/farm-cache/linux-amd64 into this agent: 1 step image(s) of \
         the previous build (",
        registry.addr
    );
    let pulled = format!("[linux/amd64] --> Cache pulled from remote {}/farm-cache/linux-amd64:", registry.addr);
    let hits: Vec<&str> = err
        .lines()
        .filter(|l| {
            l.starts_with(&imported) || l.starts_with(&pulled) || l.starts_with("[linux/amd64] --> Using cache")
        })
        .collect();
    eprintln!("the cold agent's cache hits from the registry:\n{}", hits.join("\n"));
    assert!(err.contains(&imported), "{err}");
    assert_eq!(err.matches(&pulled).count(), 3, "the three unchanged RUN steps, from the registry:\n{err}");
    assert_eq!(err.matches("[linux/amd64] --> Using cache").count(), 4, "ARG N and the three RUN steps:\n{err}");
    assert!(!err.contains("farm: no layer cache imported"), "{err}");
    let (_, _, images) = read_image(&registry, &format!("{}/app:2", registry.addr));
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].text("both"), "one\ntwo");
    assert_eq!(images[0].text("data.txt"), "second");

    // --cache-to / --cache-from name a cache of the build's own (buildx's spelling).
    std::fs::write(ctx.join("data.txt"), "third\n").unwrap();
    let from = format!("type=registry,ref={}/farm-cache", registry.addr);
    let to = format!("type=registry,ref={}/app-cache:main,mode=max", registry.addr);
    let (ok, out, err) = build(&args("app:3", &["--cache-from", &from, "--cache-to", &to]));
    assert!(ok, "{out}\n{err}");
    // buildah exports the steps it found in its own storage too, so the new cache is whole.
    let pushed = format!("[linux/amd64] --> Pushing cache {}/app-cache/main/linux-amd64:", registry.addr);
    assert_eq!(err.matches(&pushed).count(), 5, "{err}");
    assert_eq!(registry.tags("app-cache/main/linux-amd64").len(), 5);

    // A cache registry that cannot be written does not fail the build: it runs again without.
    std::fs::write(ctx.join("data.txt"), "fourth\n").unwrap();
    let (ok, out, err) = build(&args("app:4", &["--cache-to", "type=registry,ref=127.0.0.1:1/nowhere"]));
    assert!(ok, "{out}\n{err}");
    assert!(err.contains("farm: the registry cache failed (failed pushing cache to"), "{err}");
    let (_, _, images) = read_image(&registry, &format!("{}/app:4", registry.addr));
    assert_eq!(images[0].text("data.txt"), "fourth");

    // Nothing but the user's tags, the base, and the cache repositories.
    let mut catalog = registry.catalog();
    catalog.sort();
    assert_eq!(catalog, ["app", "app-cache/main/linux-amd64", "busybox", "farm-cache/linux-amd64"]);
    let mut tags = registry.tags("app");
    tags.sort();
    assert_eq!(tags, ["1", "2", "3", "4"]);
    assert_eq!(registry.tags("busybox"), ["latest"]);
}
