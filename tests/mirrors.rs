//! `[mirrors]` end to end: a local registry holding `library/busybox:1.35` stands in for Docker
//! Hub's mirror, and a Dockerfile that says `FROM busybox:1.35` (no registry in the name) builds
//! on a buildah agent and on a Docker agent (a private dockerd the test starts). No outside
//! network exists here, so a build that succeeds pulled its base image from the mirror.

mod common;

use common::docker::Engine;
use common::registry::{read_image, Registry};
use common::*;

#[test]
fn short_docker_hub_names_are_pulled_from_the_mirror_by_both_builders() {
    require_tool("buildah");
    let registry = Registry::start();
    registry.seed_busybox_as("library/busybox:1.35");
    let engine = Engine::start();
    let mut farm = Farm::start(3);
    let config = farm.tmp.path().join("agent.toml");
    std::fs::write(&config, format!("[mirrors]\n\"docker.io\" = {:?}\n", registry.addr)).unwrap();
    let config = config.to_str().unwrap();
    farm.agent("bah", &["--builder", "buildah", "--config", config]);
    farm.agent("dock", &["--builder", "docker", "--docker-host", &engine.host, "--config", config]);

    let ctx = farm.tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox:1.35\nRUN uname -m > /u\n").unwrap();
    for builder in ["buildah", "docker"] {
        let tag = format!("{}/mirrored:{builder}", registry.addr);
        let mut args = farm.client_args();
        args.extend(["--require".into(), format!("builder={builder}"), "--platform".into(), "linux/amd64".into()]);
        args.extend(["--insecure-registry".into(), registry.addr.clone(), "-t".into(), tag.clone()]);
        args.push(ctx.to_str().unwrap().into());
        let (ok, out, err) = build(&args);
        let agent = if builder == "buildah" { "bah" } else { "dock" };
        assert!(ok, "{builder}: the build failed:\n{out}\n{err}\n{}", farm.agents[agent].log());
        assert_eq!(summary(&out)["linux/amd64"], (agent.to_string(), "native".to_string()), "{out}");
        let (_, _, images) = read_image(&registry, &tag);
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].text("u"), "x86_64", "{builder}");
        eprintln!("{builder}: FROM busybox:1.35 built from the mirror {}", registry.addr);
    }
    // Without the mirror the same build cannot pull its base: there is no outside network.
    farm.agent("plain", &["--builder", "buildah", "--label", "mirrors=none"]);
    let mut args = farm.client_args();
    args.extend(["--require".into(), "mirrors=none".into(), "--platform".into(), "linux/amd64".into()]);
    args.extend(["--no-cache".into(), "-t".into(), format!("{}/mirrored:none", registry.addr)]);
    args.extend(["--insecure-registry".into(), registry.addr.clone(), ctx.to_str().unwrap().into()]);
    let (ok, out, err) = build(&args);
    assert!(!ok, "without a mirror the build should fail here:\n{out}\n{err}");
    assert!(err.contains("registry-1.docker.io"), "{err}");

    // The Docker builder gave the engine a copy of the Dockerfile; the engine holds no leftover tag.
    let images = engine.images();
    assert!(images.iter().all(|i| !i.contains("farm-task")), "{images:?}");
}
