use super::*;

fn args(a: &[(&str, &str)]) -> Vec<(String, String)> {
    a.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn err(text: &str) -> String {
    match parse(text, "Dockerfile") {
        Ok(df) => panic!("{text:?} should be refused, parsed as {df:?}"),
        Err(e) => e.to_string(),
    }
}

fn ok(text: &str) -> Dockerfile {
    parse(text, "Dockerfile").unwrap_or_else(|e| panic!("{text:?} should parse: {e}"))
}

fn deps(df: &Dockerfile, stage: usize) -> Vec<(usize, usize, DepKind)> {
    df.stages[stage].deps.iter().map(|d| (d.stage, d.line, d.kind)).collect()
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

#[test]
fn unknown_instructions_name_the_line_and_the_nearest_instruction() {
    assert_eq!(
        err("FROM busybox\nRUN true\nRUNN make\n"),
        r#"Dockerfile:3: unknown instruction "RUNN" in "RUNN make"; did you mean RUN?"#
    );
    assert_eq!(
        err("# syntax=docker/dockerfile:1\nFORM busybox\n"),
        r#"Dockerfile:2: unknown instruction "FORM" in "FORM busybox"; did you mean FROM?"#
    );
    assert_eq!(
        err("FROM busybox\nentrypiont [\"sh\"]\n"),
        r#"Dockerfile:2: unknown instruction "entrypiont" in "entrypiont [\"sh\"]"; did you mean ENTRYPOINT?"#
    );
    assert_eq!(
        err("FROM busybox\nRUN make \\\n  all\nfrobnicate the build\n"),
        r#"Dockerfile:4: unknown instruction "frobnicate" in "frobnicate the build""#
    );
    // A forgotten backslash: the next line is read as an instruction, at its own line.
    assert_eq!(
        err("FROM busybox\nRUN apt-get update &&\n    make install\n"),
        r#"Dockerfile:3: unknown instruction "make" in "make install""#
    );
    // The path the user gave names the file.
    assert_eq!(
        parse("FROM busybox\nCPY a b\n", "app/Dockerfile.prod").unwrap_err().to_string(),
        r#"app/Dockerfile.prod:2: unknown instruction "CPY" in "CPY a b"; did you mean COPY?"#
    );
}

#[test]
fn the_first_problem_in_line_order_is_reported() {
    let text = "FROM a AS one\nCOPY --from=two /x /x\nFROM b AS two\nRUNN x\n";
    assert_eq!(
        err(text),
        r#"Dockerfile:2: COPY --from=two refers to stage "two", which is defined after this one (line 3)"#
    );
}

#[test]
fn every_instruction_is_known_in_any_case() {
    let text =
        "ARG V=1\nfrom busybox:1.36 as base\nRun true\nCMD [\"sh\"]\nLABEL a=b\nMAINTAINER me\nEXPOSE 80\nENV A=b\n\
                ADD a /a\nCOPY a /a\nENTRYPOINT [\"sh\"]\nVOLUME /v\nUSER 1000\nWORKDIR /w\nARG X\nONBUILD RUN true\n\
                STOPSIGNAL SIGTERM\nHEALTHCHECK CMD true\nSHELL [\"/bin/sh\", \"-c\"]\n";
    let df = ok(text);
    assert_eq!(df.stages.len(), 1);
    assert_eq!(df.stages[0].name.as_deref(), Some("base"));
    assert_eq!((df.stages[0].first_line, df.stages[0].last_line), (2, 19));
    assert_eq!(df.global_args, [("V".to_owned(), Some("1".to_owned()))]);
}

#[test]
fn from_must_name_an_image_and_optionally_a_stage() {
    assert_eq!(err("FROM\n"), "Dockerfile:1: FROM needs an image, e.g. FROM busybox:1.36");
    assert_eq!(err("ARG P\nFROM --platform=$P\n"), "Dockerfile:2: FROM needs an image, e.g. FROM busybox:1.36");
    assert_eq!(
        err("FROM busybox\nFROM a b\n"),
        r#"Dockerfile:2: "FROM a b": FROM takes an image and optionally AS <name>, e.g. FROM golang:1.22 AS build"#
    );
    assert_eq!(
        err("FROM a AS\n"),
        r#"Dockerfile:1: "FROM a AS": FROM takes an image and optionally AS <name>, e.g. FROM golang:1.22 AS build"#
    );
    assert_eq!(
        err("FROM a AS b c\n"),
        r#"Dockerfile:1: "FROM a AS b c": FROM takes an image and optionally AS <name>, e.g. FROM golang:1.22 AS build"#
    );
    assert_eq!(
        err("FROM a AS 1st\n"),
        r#"Dockerfile:1: invalid stage name "1st" in "FROM a AS 1st": a stage name starts with a letter and has only letters, digits, '-', '_' and '.'"#
    );
    assert_eq!(
        err("FROM a AS my/stage\n"),
        r#"Dockerfile:1: invalid stage name "my/stage" in "FROM a AS my/stage": a stage name starts with a letter and has only letters, digits, '-', '_' and '.'"#
    );
    assert_eq!(
        err("FROM a AS build\nFROM b AS Build\n"),
        r#"Dockerfile:2: stage name "build" in "FROM b AS Build" is already used by the stage on line 1"#
    );
    // Names are lowercased; `as` is case-insensitive; dots, dashes and underscores are fine.
    let df = ok("FROM a as Build_1.x-y\n");
    assert_eq!(df.stages[0].name.as_deref(), Some("build_1.x-y"));
}

#[test]
fn from_takes_only_a_platform_flag_with_a_value() {
    assert_eq!(
        err("FROM --foo=1 busybox\n"),
        r#"Dockerfile:1: FROM does not take --foo in "FROM --foo=1 busybox": its only flag is --platform=<platform>"#
    );
    assert_eq!(
        err("FROM --pull busybox\n"),
        r#"Dockerfile:1: FROM does not take --pull in "FROM --pull busybox": its only flag is --platform=<platform>"#
    );
    assert_eq!(
        err("FROM --platform linux/amd64 busybox\n"),
        r#"Dockerfile:1: FROM --platform needs a value in "FROM --platform linux/amd64 busybox", e.g. FROM --platform=$BUILDPLATFORM golang:1.22"#
    );
    assert_eq!(
        err("FROM --platform=linux/amd64 --platform=linux/arm64 busybox\n"),
        r#"Dockerfile:1: FROM --platform is given twice in "FROM --platform=linux/amd64 --platform=linux/arm64 busybox""#
    );
    let df = ok("FROM --platform=$BUILDPLATFORM golang:1.22 AS build\n");
    let stage = &df.stages[0];
    assert_eq!(stage.platform.as_deref(), Some("$BUILDPLATFORM"));
    assert_eq!(stage.base, "golang:1.22");
}

#[test]
fn only_arg_may_come_before_the_first_from() {
    assert_eq!(
        err("# syntax=docker/dockerfile:1\n\n# a comment\nARG V=1\nRUN make\nFROM busybox\n"),
        r#"Dockerfile:5: RUN before the first FROM in "RUN make": only ARG may come before FROM"#
    );
    assert_eq!(
        err("env A=b\nFROM busybox\n"),
        r#"Dockerfile:1: ENV before the first FROM in "env A=b": only ARG may come before FROM"#
    );
    assert_eq!(err("ARG\nFROM busybox\n"), r#"Dockerfile:1: ARG needs a name in "ARG", e.g. ARG VERSION=1.0"#);
    assert_eq!(err("ARG =x\nFROM busybox\n"), r#"Dockerfile:1: ARG needs a name in "ARG =x", e.g. ARG VERSION=1.0"#);
}

#[test]
fn a_dockerfile_needs_a_from() {
    let msg = "Dockerfile: no FROM instruction: a Dockerfile starts a stage with FROM <image>, e.g. FROM busybox:1.36";
    assert_eq!(err(""), msg);
    assert_eq!(err("# only a comment\n\n"), msg);
    assert_eq!(err("ARG A=1\nARG B\n"), msg);
    assert_eq!(
        parse("", "ci/Containerfile").unwrap_err().to_string(),
        "ci/Containerfile: no FROM instruction: a Dockerfile starts a stage with FROM <image>, e.g. FROM busybox:1.36"
    );
}

#[test]
fn target_must_name_a_stage_and_the_message_lists_them() {
    let df = ok("FROM golang:1.22 AS build\nFROM busybox\nFROM busybox AS final\n");
    assert_eq!(
        df.check_target(Some("tset"), "Dockerfile").unwrap_err().to_string(),
        r#"--target "tset": no stage of that name in Dockerfile (stages: build, final)"#
    );
    assert_eq!(df.check_target(Some("build"), "Dockerfile"), Ok(0));
    assert_eq!(df.check_target(Some("FINAL"), "Dockerfile"), Ok(2));
    assert_eq!(df.check_target(None, "Dockerfile"), Ok(2));
    let unnamed = ok("FROM busybox\n");
    assert_eq!(
        unnamed.check_target(Some("build"), "sub/Dockerfile").unwrap_err().to_string(),
        r#"--target "build": no stage of that name in sub/Dockerfile (no stage has a name: name one with FROM <image> AS <name>)"#
    );
}

const LATER: &str = "\
FROM golang:1.22 AS build
RUN go build -o /app
FROM build AS test
RUN go test
FROM busybox:1.36 AS final
WORKDIR /srv
COPY --from=later /x /x
COPY --from=build /app /app
FROM busybox:1.36 AS later
";

#[test]
fn copy_from_a_later_stage_is_refused() {
    assert_eq!(
        err(LATER),
        r#"Dockerfile:7: COPY --from=later refers to stage "later", which is defined after this one (line 9)"#
    );
    let numeric = LATER.replace("--from=later", "--from=3");
    assert_eq!(
        err(&numeric),
        "Dockerfile:7: COPY --from=3 refers to stage 3, which is defined after this one (line 9)"
    );
}

#[test]
fn copy_from_this_stage_or_a_missing_index_is_refused() {
    assert_eq!(
        err(&LATER.replace("--from=later", "--from=Final")),
        r#"Dockerfile:7: COPY --from=Final refers to stage "final", which is this stage: a stage can use earlier stages only"#
    );
    assert_eq!(
        err(&LATER.replace("--from=later", "--from=2")),
        "Dockerfile:7: COPY --from=2 refers to stage 2, which is this stage: a stage can use earlier stages only"
    );
    assert_eq!(
        err(&LATER.replace("--from=later", "--from=4")),
        "Dockerfile:7: COPY --from=4 refers to stage 4, but Dockerfile has only 4 stages (0 to 3)"
    );
    assert_eq!(
        err(&LATER.replace("--from=later", "--from=-1")),
        "Dockerfile:7: COPY --from=-1 refers to stage -1, but Dockerfile has only 4 stages (0 to 3)"
    );
    assert_eq!(
        err("FROM busybox\nCOPY --from=0 /a /b\n"),
        "Dockerfile:2: COPY --from=0 refers to stage 0, which is this stage: a stage can use earlier stages only"
    );
}

#[test]
fn copy_from_an_earlier_stage_is_a_dependency_and_anything_else_an_image() {
    let text = LATER.replace("--from=later", "--from=0").replace(
        "COPY --from=build /app /app",
        "COPY --from=alpine:3.19 /etc/x /x\nCOPY --from=BUILD --chown=1:1 [\"/app b\", \"/app\"]",
    );
    let df = ok(&text);
    assert_eq!(deps(&df, 0), []);
    assert_eq!(deps(&df, 1), [(0, 3, DepKind::Base)]);
    assert_eq!(deps(&df, 2), [(0, 7, DepKind::CopyFrom), (0, 9, DepKind::CopyFrom)]);
    assert_eq!(df.stages_needed(2), [0, 2]);
    assert_eq!(df.stages_needed(1), [0, 1]);
    assert_eq!(df.stages_needed(3), [3]);
    // An unknown --from value is an image (BuildKit pulls it), so it is no dependency and no error.
    assert_eq!(base_images(&text, &[]), ["golang:1.22", "busybox:1.36"]);
}

#[test]
fn run_mount_from_is_a_dependency_and_checked_like_copy_from() {
    let text = "\
FROM golang:1.22 AS deps
RUN go mod download
FROM golang:1.22 AS build
RUN --mount=type=cache,target=/root/.cache --mount=type=bind,from=deps,source=/go,target=/go go build
FROM busybox AS final
RUN --mount=\"type=bind,from=1,target=/b\" cp /b/app /app
";
    let df = ok(text);
    assert_eq!(deps(&df, 1), [(0, 4, DepKind::MountFrom)]);
    assert_eq!(deps(&df, 2), [(1, 6, DepKind::MountFrom)]);
    assert_eq!(df.stages_needed(2), [0, 1, 2]);
    assert_eq!(
        err(&text.replace("from=deps", "from=final")),
        r#"Dockerfile:4: RUN --mount=type=bind,from=final,source=/go,target=/go refers to stage "final", which is defined after this one (line 5)"#
    );
    assert_eq!(
        err(&text.replace("from=deps", "from=build")),
        r#"Dockerfile:4: RUN --mount=type=bind,from=build,source=/go,target=/go refers to stage "build", which is this stage: a stage can use earlier stages only"#
    );
    // An image is fine.
    ok(&text.replace("from=deps", "from=golang:1.22"));
}

#[test]
fn heredoc_bodies_are_not_instructions() {
    let text = "\
FROM busybox AS build
RUN <<EOF
RUNN this is shell, not Dockerfile
FROM nothing
EOF
COPY <<-\"END\" /etc/conf
\tFROM still body
\tEND
RUN <<ONE cat - && sh <<'TWO' > /out
ONE body
ONE
TWO body
TWO
FROM busybox AS final
COPY --from=build /out /out
";
    let df = ok(text);
    assert_eq!(df.stages.len(), 2);
    assert_eq!((df.stages[0].first_line, df.stages[0].last_line), (1, 13));
    assert_eq!((df.stages[1].first_line, df.stages[1].last_line), (14, 15));
    assert_eq!(deps(&df, 1), [(0, 15, DepKind::CopyFrom)]);
    assert_eq!(base_images(text, &[]), ["busybox"]);
}

#[test]
fn heredoc_terminators_must_match_exactly() {
    // Without `<<-`, an indented terminator is body; a quoted `<<` word is no heredoc; nor is `<<<`.
    let text = "FROM busybox\nRUN <<EOF\n\tEOF\nEOF\nRUN echo \"<<EOF\" && cat <<<x\nRUNN\n";
    assert_eq!(err(text), r#"Dockerfile:6: unknown instruction "RUNN" in "RUNN"; did you mean RUN?"#);
    assert_eq!(
        err("FROM busybox\nRUN true\nRUN <<EOF\necho never closed\neof\n"),
        r#"Dockerfile:3: heredoc <<EOF in "RUN <<EOF" is never closed: end it with a line "EOF""#
    );
    // Heredocs belong to RUN, COPY and ADD (and ONBUILD of them) only.
    assert_eq!(
        err("FROM busybox\nCMD cat <<EOF\nRUNN\nEOF\n"),
        r#"Dockerfile:3: unknown instruction "RUNN" in "RUNN"; did you mean RUN?"#
    );
    // In JSON form the `<<` words are quoted: no heredoc.
    assert_eq!(
        err("FROM busybox\nRUN [\"sh\", \"-c\", \"cat <<EOF\"]\nRUN [\"cat\", \"<<EOF\"]\nRUNN\n"),
        r#"Dockerfile:4: unknown instruction "RUNN" in "RUNN"; did you mean RUN?"#
    );
    let df = ok("FROM busybox\nONBUILD RUN <<EOF\nRUNN\nEOF\nADD <<EOF /x\nFROM body\nEOF\n");
    assert_eq!((df.stages.len(), df.stages[0].last_line), (1, 7));
}

#[test]
fn continuations_skip_comments_and_blank_lines_and_report_the_first_line() {
    let text =
        "FROM busybox\nRUN echo a \\\n# a comment inside\n\n    && echo b \\   \n    && echo c\nRUNN x \\\n  y\n";
    assert_eq!(err(text), r#"Dockerfile:7: unknown instruction "RUNN" in "RUNN x   y"; did you mean RUN?"#);
    let df = ok("FROM \\\n  golang:1.22 \\\n  AS \\\n  build\nRUN make \\\n");
    assert_eq!(df.stages[0].name.as_deref(), Some("build"));
    assert_eq!(df.stages[0].base, "golang:1.22");
    assert_eq!((df.stages[0].line, df.stages[0].last_line), (1, 5));
    // CRLF line endings and a byte-order mark.
    let df = ok("\u{feff}FROM busybox AS a\r\nRUN x \\\r\n  y\r\nFROM a\r\n");
    assert_eq!(deps(&df, 1), [(0, 4, DepKind::Base)]);
}

#[test]
fn the_escape_directive_makes_backtick_the_continuation() {
    let text =
        "# escape=`\nFROM mcr.microsoft.com/windows/servercore AS build\nRUN dir `\n  c:\\\nCOPY c:\\ d:\\\nRUNN x\n";
    assert_eq!(err(text), r#"Dockerfile:6: unknown instruction "RUNN" in "RUNN x"; did you mean RUN?"#);
    let df = ok(&text.replace("RUNN x\n", ""));
    assert_eq!(df.escape, '`');
    assert_eq!(df.stages[0].last_line, 5);
    // Directives: case and spacing free, only at the very top.
    assert_eq!(ok("#  ESCAPE = `\nFROM a\n").escape, '`');
    assert_eq!(ok("# syntax=docker/dockerfile:1\n# escape=`\nFROM a\n").escape, '`');
    assert_eq!(ok("\n# escape=`\nFROM a\n").escape, '\\');
    assert_eq!(ok("FROM a\n# escape=`\n").escape, '\\');
    assert_eq!(
        err("# escape=x\nFROM a\n"),
        r#"Dockerfile:1: invalid escape directive "x": the escape character must be \ or `"#
    );
}

#[test]
fn onbuild_triggers_are_checked() {
    assert_eq!(
        err("FROM a\nONBUILD RUNN make\n"),
        r#"Dockerfile:2: unknown instruction "RUNN" in "ONBUILD RUNN make"; did you mean RUN?"#
    );
    assert_eq!(
        err("FROM a\nONBUILD FROM b\n"),
        r#"Dockerfile:2: FROM cannot be an ONBUILD trigger in "ONBUILD FROM b""#
    );
    assert_eq!(err("FROM a\nONBUILD\n"), "Dockerfile:2: ONBUILD needs an instruction, e.g. ONBUILD RUN make");
    // An ONBUILD COPY --from runs in the images built on this one: no dependency here.
    let df = ok("FROM a AS x\nFROM b\nONBUILD COPY --from=x /a /a\n");
    assert_eq!(deps(&df, 1), []);
}

#[test]
fn the_stage_model() {
    let text = "\
# syntax=docker/dockerfile:1
ARG GO=1.22 BASE=\"busybox:1.36\"
ARG REG
FROM --platform=$BUILDPLATFORM golang:${GO} AS build
RUN go build

FROM ${BASE}
COPY --from=build /app /app
";
    let df = ok(text);
    assert_eq!(
        df.global_args,
        [
            ("GO".to_owned(), Some("1.22".to_owned())),
            ("BASE".to_owned(), Some("\"busybox:1.36\"".to_owned())),
            ("REG".to_owned(), None)
        ]
    );
    let s = &df.stages;
    assert_eq!(s.len(), 2);
    assert_eq!((s[0].index, s[0].name.as_deref(), s[0].base.as_str()), (0, Some("build"), "golang:${GO}"));
    assert_eq!(
        (s[0].platform.as_deref(), s[0].line, s[0].first_line, s[0].last_line),
        (Some("$BUILDPLATFORM"), 4, 4, 5)
    );
    assert_eq!(
        (s[1].index, s[1].name.as_deref(), s[1].base.as_str(), s[1].platform.as_deref()),
        (1, None, "${BASE}", None)
    );
    assert_eq!((s[1].line, s[1].first_line, s[1].last_line), (7, 7, 8));
    assert_eq!(df.base_images(&[]), ["golang:1.22", "busybox:1.36"]);
    assert_eq!(df.base_images(&args(&[("GO", "1.23")])), ["golang:1.23", "busybox:1.36"]);
    // The lines a stage spans are the text to slice.
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[s[1].first_line - 1..s[1].last_line].join("\n"), "FROM ${BASE}\nCOPY --from=build /app /app");
}

#[test]
fn build_args_choose_stages() {
    let text = "\
ARG VARIANT=a
ARG FROMSTAGE=tools
FROM --platform=$BUILDPLATFORM golang:1.22 AS tools
FROM alpine AS base-a
FROM --platform=$BUILDPLATFORM alpine AS base-b
FROM base-${VARIANT} AS final
ARG FROMSTAGE
COPY --from=$FROMSTAGE /t /t
";
    let df = ok(text);
    assert_eq!(deps(&df, 3), [(1, 6, DepKind::Base), (0, 8, DepKind::CopyFrom)]);
    assert_eq!(df.stages_needed(3), [0, 1, 3]);
    assert_eq!(df.stages_needed_with_args(3, &args(&[("VARIANT", "b")])), [0, 2, 3]);
    assert_eq!(df.stages_needed_with_args(3, &args(&[("FROMSTAGE", "busybox")])), [1, 3]);
    assert_eq!(df.base_images(&[]), ["golang:1.22", "alpine"]);
    assert_eq!(df.build_platform_stages(3, &[], "linux/amd64"), [0]);
    // base-b runs on the build platform, and final inherits its platform from it.
    assert_eq!(df.build_platform_stages(3, &args(&[("VARIANT", "b")]), "linux/amd64"), [0, 2, 3]);
}

const BUILDERS: &str = "\
ARG GO=golang:1.22
ARG OTHER=linux/arm64
FROM --platform=$BUILDPLATFORM ${GO} AS tools
RUN make tools
FROM --platform=${BUILDPLATFORM} golang:1.22 AS build
COPY --from=tools /t /t
RUN make
FROM build AS test
RUN make test
FROM --platform=$TARGETPLATFORM alpine AS rt
FROM --platform=linux/x86_64 alpine AS explicit
FROM --platform=$OTHER alpine AS other
FROM --platform=$BUILDOS/$BUILDARCH alpine AS split
FROM alpine AS final
COPY --from=build /app /app
COPY --from=explicit /e /e
COPY --from=rt /r /r
COPY --from=other /o /o
COPY --from=split /s /s
";

#[test]
fn build_platform_stages_follow_chains_and_inheritance() {
    let df = ok(BUILDERS);
    let final_ = df.check_target(None, "Dockerfile").unwrap();
    assert_eq!(final_, 7);
    assert_eq!(df.stages_needed(final_), [0, 1, 3, 4, 5, 6, 7]);
    // tools and build (a BUILDPLATFORM stage copying from another), the literal platform that
    // equals the native one under another spelling, and $BUILDOS/$BUILDARCH; not
    // $TARGETPLATFORM, not another platform, not a stage without --platform.
    assert_eq!(df.build_platform_stages(final_, &[], "linux/amd64"), [0, 1, 4, 6]);
    assert_eq!(df.build_platform_stages(final_, &[], "linux/arm64"), [0, 1, 5, 6]);
    assert_eq!(df.build_platform_stages(final_, &args(&[("OTHER", "amd64")]), "linux/amd64"), [0, 1, 4, 5, 6]);
    // --target test: test starts FROM build and so runs on build's platform; rt is not needed.
    let test = df.check_target(Some("test"), "Dockerfile").unwrap();
    assert_eq!(df.build_platform_stages(test, &[], "linux/amd64"), [0, 1, 2]);
    assert_eq!(df.build_platform_stages(df.stage("tools").unwrap(), &[], "linux/arm/v7"), [0]);
    assert_eq!(df.build_platform_stages(df.stage("rt").unwrap(), &[], "linux/amd64"), Vec::<usize>::new());
}

#[test]
fn build_platform_stages_when_nothing_is_native() {
    let df = ok("FROM golang:1.22 AS build\nFROM alpine\nCOPY --from=build /a /a\n");
    assert_eq!(df.build_platform_stages(1, &[], "linux/amd64"), Vec::<usize>::new());
    // An empty platform (an unset ARG) is not the native one.
    let df = ok("ARG P\nFROM --platform=$P alpine\n");
    assert_eq!(df.build_platform_stages(0, &[], "linux/amd64"), Vec::<usize>::new());
    assert_eq!(df.build_platform_stages(0, &args(&[("P", "linux/amd64")]), "linux/amd64"), [0]);
}

#[test]
fn the_lenient_reading_still_finds_images_in_a_bad_dockerfile() {
    let text = "RUNN x\nFROM a b\nFROM --bogus busybox AS 9\nCOPY --from=later /a /a\nRUN <<EOF\n";
    assert_eq!(base_images(text, &[]), ["a", "busybox"]);
}

#[test]
fn substitution_follows_the_shell_lexer() {
    let vars: HashMap<String, String> =
        [("A", "x"), ("E", "")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let cases = [
        ("$A", "x"),
        ("${A}y", "xy"),
        ("$A-$B.", "x-."),
        ("${B:-d}", "d"),
        ("${E:-d}", "d"),
        ("${E-d}", ""),
        ("${B-${A}z}", "xz"),
        ("${A:+alt}", "alt"),
        ("${E:+alt}", ""),
        ("${E+alt}", "alt"),
        ("'$A'", "$A"),
        ("\"$A b\"", "x b"),
        ("\\$A", "$A"),
        ("a$", "a$"),
    ];
    for (word, want) in cases {
        assert_eq!(expand(word, &vars, '\\'), want, "{word}");
    }
    assert_eq!(expand("`$A", &vars, '`'), "$A");
    assert_eq!(unquote("\"b u\"'x'", '\\'), "b ux");
}

#[test]
fn suggestions_only_for_near_misses() {
    assert_eq!(suggest("RUNN"), Some("RUN"));
    assert_eq!(suggest("FORM"), Some("FROM"));
    assert_eq!(suggest("WORKDR"), Some("WORKDIR"));
    assert_eq!(suggest("HEALTHCHEK"), Some("HEALTHCHECK"));
    assert_eq!(suggest("AG"), Some("ARG"));
    assert_eq!(suggest("CP"), None);
    assert_eq!(suggest("MAKE"), None);
    assert_eq!(suggest("ECHO"), None);
}

#[test]
fn long_instructions_are_shortened_in_messages() {
    let text = format!("FROM busybox\nmake install {}\n", "x".repeat(200));
    let want = format!(r#"Dockerfile:2: unknown instruction "make" in "make install {}...""#, "x".repeat(84));
    assert_eq!(err(&text), want);
}

#[test]
fn names_of_named_contexts_are_accepted_where_stages_are() {
    // `--build-context extra=DIR`: a name that is no stage is read as an image (as BuildKit
    // reads it), so the check passes; the coordinator drops named contexts from the base images.
    let df = ok("FROM busybox AS b\nCOPY --from=extra /file /x\nRUN --mount=type=bind,from=extra,target=/e cat /e/file\nFROM extra\n");
    assert_eq!(df.check_target(None, "Dockerfile").unwrap(), 1);
    assert_eq!(df.base_images(&[]), ["busybox", "extra"]);
}

/// farm's own image (deploy/Dockerfile, which the Kubernetes manifests run) is one farm's client
/// accepts: a build stage on the build machine's platform that cross-compiles, then the runtime.
#[test]
fn deploy_dockerfile_parses_with_a_build_platform_build_stage() {
    let text = include_str!("../../../deploy/Dockerfile");
    let df = parse(text, "deploy/Dockerfile").unwrap_or_else(|e| panic!("deploy/Dockerfile is refused: {e}"));
    let stages: Vec<(Option<&str>, &str, Option<&str>)> =
        df.stages.iter().map(|s| (s.name.as_deref(), s.base.as_str(), s.platform.as_deref())).collect();
    assert_eq!(
        stages,
        [(Some("build"), "rust:1-bookworm", Some("$BUILDPLATFORM")), (None, "debian:bookworm-slim", None)]
    );
    assert_eq!(base_images(text, &[]), ["rust:1-bookworm", "debian:bookworm-slim"]);
    let runtime = df.stages.len() - 1;
    assert_eq!(df.stages_needed_with_args(runtime, &[]), [0, 1]);
    // Whatever platform the build machine is, the compile runs there, not under QEMU; the runtime
    // stage is the target platform's.
    for native in ["linux/amd64", "linux/arm64", "linux/arm/v7"] {
        assert_eq!(df.build_platform_stages(runtime, &[], native), [0], "on {native}");
    }
}
