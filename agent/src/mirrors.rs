//! Base image mirrors (`[mirrors]` in the agent config: `"docker.io" = "mirror.lan:5000"`), so
//! that a farm of Pis pulls each base layer once from the LAN instead of once per agent from
//! Docker Hub. Pure: what each builder is given.
//!
//! - buildah reads mirrors from the build's registries.conf ([`registries_conf`]);
//! - a Docker Engine's own `registry-mirrors` apply to docker.io only and are daemon config, so
//!   the Dockerfile's `FROM` lines that name a mirrored registry are rewritten to the mirror
//!   ([`rewrite_dockerfile`]) and the build is given that copy.

use std::collections::BTreeMap;

use shared::oci::ImageRef;

/// Registry host → mirror (`host[:port][/path]`).
pub type Mirrors = BTreeMap<String, String>;

/// Checks a `[mirrors]` table and spells Docker Hub's names one way (`index.docker.io` and
/// `registry-1.docker.io` are `docker.io`). An error names the entry and what is wrong.
pub fn normalise(table: &BTreeMap<String, String>) -> Result<Mirrors, String> {
    let mut out = Mirrors::new();
    for (registry, mirror) in table {
        let bad = |why: &str| format!("[mirrors] {registry:?} = {mirror:?}: {why}");
        if registry.is_empty() || registry.contains(['/', ' ']) || registry.contains("://") {
            return Err(bad("the key must be a registry host, e.g. \"docker.io\" or \"ghcr.io\""));
        }
        if mirror.is_empty() || mirror.contains("://") || mirror.contains(char::is_whitespace) || mirror.ends_with('/')
        {
            return Err(bad("the mirror must be HOST[:PORT] with no scheme, e.g. \"mirror.lan:5000\""));
        }
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => shared::oci::DOCKER_HUB.to_string(),
            r => r.to_string(),
        };
        out.insert(registry, mirror.clone());
    }
    Ok(out)
}

/// Whether a registry (`host[:port][/path]`) is to be spoken to over plain HTTP: named in the
/// build's insecure registries, or on loopback (127.0.0.0/8, localhost).
pub fn is_insecure(registry: &str, insecure_registries: &[String]) -> bool {
    let host_port = registry.split('/').next().unwrap_or(registry);
    let host = match host_port.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host_port,
    };
    insecure_registries.iter().any(|r| r == registry || r == host_port)
        || host == "localhost"
        || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// The registries.conf of one buildah build: short names resolve on docker.io; each plain-HTTP
/// registry is marked insecure; each mirrored registry pulls from its mirror first.
pub fn registries_conf(insecure_registries: &[String], mirrors: &Mirrors) -> String {
    let mut text = String::from("unqualified-search-registries = [\"docker.io\"]\nshort-name-mode = \"permissive\"\n");
    for r in insecure_registries.iter().filter(|r| !mirrors.contains_key(r.as_str())) {
        text += &format!("\n[[registry]]\nlocation = {r:?}\ninsecure = true\n");
    }
    for (registry, mirror) in mirrors {
        let insecure = insecure_registries.contains(registry);
        text += &format!("\n[[registry]]\nprefix = {registry:?}\nlocation = {registry:?}\ninsecure = {insecure}\n");
        let insecure = is_insecure(mirror, insecure_registries);
        text += &format!("\n[[registry.mirror]]\nlocation = {mirror:?}\ninsecure = {insecure}\n");
    }
    text
}

/// `image` pulled through its registry's mirror, if it has one (`busybox:1.35` with docker.io
/// mirrored at `m:5000` → `m:5000/library/busybox:1.35`).
pub fn mirrored(image: &str, mirrors: &Mirrors) -> Option<String> {
    let r: ImageRef = image.parse().ok()?;
    let mirror = mirrors.get(&r.registry)?;
    Some(ImageRef { registry: mirror.clone(), ..r }.to_string())
}

/// `dockerfile` with every `FROM` whose image (global `ARG`s and `build_args` substituted) is on
/// a mirrored registry pointing at the mirror instead; `None` if no `FROM` is (or the file does
/// not parse: the builder then reports it as it would).
pub fn rewrite_dockerfile(dockerfile: &str, build_args: &[(String, String)], mirrors: &Mirrors) -> Option<String> {
    if mirrors.is_empty() {
        return None;
    }
    let parsed = shared::dockerfile::parse(dockerfile, "Dockerfile").ok()?;
    let mut lines: Vec<String> = dockerfile.split_inclusive('\n').map(str::to_string).collect();
    let mut changed = false;
    for (stage, image) in parsed.stages.iter().zip(parsed.stage_images(build_args)) {
        let Some(to) = image.and_then(|i| mirrored(&i, mirrors)) else { continue };
        // The base is the first word after FROM and its flags, on the FROM line or a continuation.
        for (n, line) in lines.iter_mut().enumerate().take(stage.last_line).skip(stage.line - 1) {
            if let Some(new) = replace_base(line, &stage.base, &to, n + 1 == stage.line) {
                *line = new;
                changed = true;
                break;
            }
        }
    }
    changed.then(|| lines.concat())
}

/// `line` with the word `base` (not a `--flag`, not `FROM` itself) replaced by `to`.
fn replace_base(line: &str, base: &str, to: &str, from_line: bool) -> Option<String> {
    let mut at = 0;
    let mut first = true;
    for word in line.split_whitespace() {
        let start = at + line[at..].find(word).expect("a word of the line");
        at = start + word.len();
        if first && from_line {
            first = false;
            continue;
        }
        if word.starts_with("--") {
            continue;
        }
        return (word == base).then(|| format!("{}{to}{}", &line[..start], &line[at..]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(mirror: &str) -> Mirrors {
        Mirrors::from([("docker.io".to_string(), mirror.to_string())])
    }

    #[test]
    fn short_names_and_hub_names_go_to_the_hub_mirror() {
        let m = hub("mirror.lan:5000");
        assert_eq!(mirrored("busybox:1.35", &m).as_deref(), Some("mirror.lan:5000/library/busybox:1.35"));
        assert_eq!(mirrored("docker.io/library/busybox", &m).as_deref(), Some("mirror.lan:5000/library/busybox"));
        assert_eq!(mirrored("index.docker.io/me/app:2", &m).as_deref(), Some("mirror.lan:5000/me/app:2"));
        let pinned = format!("alpine@sha256:{}", "a".repeat(64));
        assert_eq!(mirrored(&pinned, &m), Some(format!("mirror.lan:5000/library/alpine@sha256:{}", "a".repeat(64))));
        assert_eq!(mirrored("ghcr.io/o/app:1", &m), None);
        assert_eq!(mirrored("127.0.0.1:5000/busybox", &m), None);
    }

    #[test]
    fn from_lines_are_rewritten_with_args_resolved() {
        let m = hub("127.0.0.1:5000");
        let dockerfile = "\
# syntax=docker/dockerfile:1
ARG BASE=busybox:1.35
ARG GO=golang
FROM --platform=$BUILDPLATFORM ${GO}:1.22 AS build
RUN echo FROM busybox:1.35
FROM build AS again
FROM ghcr.io/o/tools:1 AS tools
FROM scratch AS empty
FROM $BASE
COPY --from=build /a /a
";
        let out = rewrite_dockerfile(dockerfile, &[("GO".into(), "docker.io/library/golang".into())], &m).unwrap();
        assert_eq!(
            out,
            "\
# syntax=docker/dockerfile:1
ARG BASE=busybox:1.35
ARG GO=golang
FROM --platform=$BUILDPLATFORM 127.0.0.1:5000/library/golang:1.22 AS build
RUN echo FROM busybox:1.35
FROM build AS again
FROM ghcr.io/o/tools:1 AS tools
FROM scratch AS empty
FROM 127.0.0.1:5000/library/busybox:1.35
COPY --from=build /a /a
"
        );
        // Nothing mirrored, no mirrors, or a Dockerfile that does not parse: no rewrite.
        assert_eq!(rewrite_dockerfile("FROM ghcr.io/o/a:1\n", &[], &m), None);
        assert_eq!(rewrite_dockerfile("FROM busybox\n", &[], &Mirrors::new()), None);
        assert_eq!(rewrite_dockerfile("RUN true\n", &[], &m), None);
    }

    #[test]
    fn a_continued_from_line_is_rewritten() {
        let m = hub("m:5000");
        let out = rewrite_dockerfile("FROM \\\n  busybox AS b\nRUN true\n", &[], &m).unwrap();
        assert_eq!(out, "FROM \\\n  m:5000/library/busybox AS b\nRUN true\n");
    }

    #[test]
    fn registries_conf_lists_insecure_registries_and_mirrors() {
        let insecure = vec!["127.0.0.1:5000".to_string(), "reg.lan:5000".to_string()];
        let mirrors = Mirrors::from([
            ("docker.io".to_string(), "127.0.0.1:5000".to_string()),
            ("ghcr.io".to_string(), "cache.lan".to_string()),
            ("reg.lan:5000".to_string(), "reg2.lan:5000".to_string()),
        ]);
        assert_eq!(
            registries_conf(&insecure, &mirrors),
            r#"unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"

[[registry]]
location = "127.0.0.1:5000"
insecure = true

[[registry]]
prefix = "docker.io"
location = "docker.io"
insecure = false

[[registry.mirror]]
location = "127.0.0.1:5000"
insecure = true

[[registry]]
prefix = "ghcr.io"
location = "ghcr.io"
insecure = false

[[registry.mirror]]
location = "cache.lan"
insecure = false

[[registry]]
prefix = "reg.lan:5000"
location = "reg.lan:5000"
insecure = true

[[registry.mirror]]
location = "reg2.lan:5000"
insecure = false
"#
        );
        assert_eq!(
            registries_conf(&insecure[..1], &Mirrors::new()),
            "unqualified-search-registries = [\"docker.io\"]\nshort-name-mode = \"permissive\"\n\n[[registry]]\nlocation = \"127.0.0.1:5000\"\ninsecure = true\n"
        );
    }

    #[test]
    fn loopback_and_listed_mirrors_are_plain_http() {
        assert!(is_insecure("127.0.0.1:5000", &[]));
        assert!(is_insecure("127.8.9.1", &[]));
        assert!(is_insecure("localhost:5000/hub", &[]));
        assert!(!is_insecure("mirror.lan:5000", &[]));
        assert!(is_insecure("mirror.lan:5000", &["mirror.lan:5000".into()]));
    }

    #[test]
    fn mirror_tables_are_checked() {
        let t = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(normalise(&t("index.docker.io", "m:5000")).unwrap(), hub("m:5000"));
        assert_eq!(
            normalise(&t("docker.io", "http://m:5000")).unwrap_err(),
            "[mirrors] \"docker.io\" = \"http://m:5000\": the mirror must be HOST[:PORT] with no scheme, e.g. \"mirror.lan:5000\""
        );
        assert!(normalise(&t("https://docker.io", "m")).unwrap_err().contains("the key must be a registry host"));
    }
}
