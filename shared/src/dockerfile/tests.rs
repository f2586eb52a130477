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
