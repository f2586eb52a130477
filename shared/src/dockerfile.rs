//! The base images a Dockerfile builds on, read without building it.
//!
//! The result cache must know them: a build's inputs include the digest every `FROM` tag points
//! to *now*, so that a base image moved under the same tag misses the cache. Stage names
//! (`FROM build`) and `scratch` are not images; `ARG`s declared before the first `FROM` are
//! substituted, with the build's `--build-arg` values over their defaults.

use std::collections::HashMap;

/// The distinct image references the `FROM` lines name, in order.
pub fn base_images(dockerfile: &str, build_args: &[(String, String)]) -> Vec<String> {
    let mut globals: HashMap<String, String> = HashMap::new();
    let mut stages: Vec<String> = Vec::new();
    let mut images: Vec<String> = Vec::new();
    let mut seen_from = false;
    for line in logical_lines(dockerfile) {
        let mut words = line.split_whitespace();
        let Some(instr) = words.next() else { continue };
        match instr.to_ascii_uppercase().as_str() {
            "ARG" if !seen_from => {
                for decl in words {
                    let (name, default) = match decl.split_once('=') {
                        Some((n, d)) => (n, Some(d.trim_matches('"').to_string())),
                        None => (decl, None),
                    };
                    let value = build_args.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone()).or(default);
                    if let Some(v) = value {
                        globals.insert(name.to_string(), v);
                    }
                }
            }
            "FROM" => {
                seen_from = true;
                let rest: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
                let Some(image) = rest.first() else { continue };
                let image = substitute(image, &globals);
                if let (Some(as_kw), Some(name)) = (rest.get(1), rest.get(2)) {
                    if as_kw.eq_ignore_ascii_case("as") {
                        stages.push(name.to_ascii_lowercase());
                    }
                }
                let is_stage = stages[..stages.len().saturating_sub(usize::from(rest.len() >= 3))]
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(&image));
                if !image.is_empty() && !image.eq_ignore_ascii_case("scratch") && !is_stage && !images.contains(&image)
                {
                    images.push(image);
                }
            }
            _ => {}
        }
    }
    images
}

/// Lines with `\` continuations joined and comments dropped.
fn logical_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for raw in text.lines() {
        let trimmed = raw.trim();
        if current.is_empty() && (trimmed.starts_with('#') || trimmed.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// `$NAME` and `${NAME}` (and `${NAME:-default}`) from `vars`; unknown names become empty.
fn substitute(word: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'{') {
            chars.next();
            let inner: String = chars.by_ref().take_while(|&c| c != '}').collect();
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n.to_string(), Some(d.to_string())),
                None => (inner, None),
            };
            out.push_str(vars.get(&name).map(String::as_str).or(default.as_deref()).unwrap_or(""));
        } else {
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    name.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[(&str, &str)]) -> Vec<(String, String)> {
        a.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn stages_scratch_and_duplicates_are_not_images() {
        let df = "# comment\nFROM golang:1.22 AS build\nRUN go build\nFROM build AS test\nFROM scratch\nCOPY --from=build /x /x\nFROM golang:1.22\n";
        assert_eq!(base_images(df, &[]), ["golang:1.22"]);
    }

    #[test]
    fn global_args_are_substituted_with_build_args_over_defaults() {
        let df = "ARG BASE=busybox:latest\nARG TAG\nFROM ${BASE} AS one\nFROM --platform=$BUILDPLATFORM alpine:${TAG:-3.19}\nFROM reg:5000/x:$TAG\n";
        assert_eq!(base_images(df, &[]), ["busybox:latest", "alpine:3.19", "reg:5000/x:"]);
        let got = base_images(df, &args(&[("BASE", "127.0.0.1:5000/busybox:1"), ("TAG", "2")]));
        assert_eq!(got, ["127.0.0.1:5000/busybox:1", "alpine:2", "reg:5000/x:2"]);
    }

    #[test]
    fn continuations_and_lowercase_instructions() {
        let df = "from \\\n  debian:12 \\\n  as base\nfrom base\n";
        assert_eq!(base_images(df, &[]), ["debian:12"]);
    }
}
