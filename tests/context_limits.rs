//! A coordinator configured with higher context limits than the defaults builds a context above
//! the defaults: the agents check a context against the limits the coordinator accepted it
//! under (sent with each assignment), not against their own built-in ones.
//! The manifest (about 8.7 MB here, more than one frame may carry) travels as a blob: only the
//! coordinator's config changes.

mod common;

use common::registry::{read_image, Registry};
use common::*;

/// One more entry than the default `max_context_files` (100,000).
const FILES: usize = 100_001;

#[test]
fn a_coordinator_with_raised_limits_builds_a_context_above_the_defaults() {
    require_tool("buildah");
    let registry = Registry::start();
    let base = registry.seed_busybox();
    let mut farm = Farm::start(3);
    let config = farm.tmp.path().join("coordinator.toml");
    std::fs::write(&config, "max_context_files = 200000\n").unwrap();
    farm.restart_coordinator_env(&[("FARM_CONFIG", config.to_str().unwrap())]);
    farm.agent("x86", &[]);

    let ctx = farm.tmp.path().join("ctx");
    let many = ctx.join("many");
    std::fs::create_dir_all(&many).unwrap();
    // Empty files: one blob, 100,001 manifest entries.
    for i in 0..FILES {
        std::fs::File::create(many.join(i.to_string())).unwrap();
    }
    std::fs::write(ctx.join("Dockerfile"), "ARG BASE\nFROM $BASE\nCOPY many/99999 /last\nRUN ls /last > /seen\n")
        .unwrap();

    let tag = format!("{}/limits:1", registry.addr);
    let mut args = farm.client_args();
    args.extend(registry.build_flags(&base, "linux/amd64", "limits:1", &ctx));
    let (ok, out, err) = build(&args);
    assert!(ok, "the build of a {FILES}-file context failed:\n{out}\n{err}");
    let (_, _, images) = read_image(&registry, &tag);
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].text("seen"), "/last");
}
