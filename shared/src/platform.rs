//! Users, Dockerfiles, `uname` and binfmt_misc each spell the same platform differently (`aarch64`,
//! `arm64/v8`, `ARM64`); if those spellings reached the scheduler, an agent offering `arm64` would
//! never match a job asking for `aarch64`. So every platform is normalised once, at the edge, the
//! way containerd does it, and the only values that exist afterwards are the canonical ones farm
//! can actually build.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Every platform farm builds for, in canonical form and in the order lists are reported.
pub const SUPPORTED: &[&str] = &[
    "linux/amd64",
    "linux/386",
    "linux/arm64",
    "linux/arm/v7",
    "linux/arm/v6",
    "linux/riscv64",
    "linux/ppc64le",
    "linux/s390x",
];

/// Operating systems Go (and so containerd) knows; a first component naming one of them is an
/// OS, anything else is read as an architecture of an implied `linux`.
const KNOWN_OS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "hurd",
    "illumos",
    "ios",
    "js",
    "linux",
    "macos",
    "nacl",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
    "zos",
];

/// An OCI platform farm can build for; only ever holds one of [`SUPPORTED`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

/// Why a platform string was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PlatformError {
    #[error("empty platform: farm builds for {accepted}", accepted = SUPPORTED.join(", "))]
    Empty,
    #[error(
        "unsupported operating system {os:?} in {input:?}: farm builds Linux images only ({accepted})",
        accepted = SUPPORTED.join(", ")
    )]
    NotLinux { input: String, os: String },
    #[error("unknown platform {0:?}: farm builds for {accepted}", accepted = SUPPORTED.join(", "))]
    Unknown(String),
    #[error("platform {platform} is listed twice (as {first:?} and {second:?})")]
    Duplicate { platform: String, first: String, second: String },
    #[error(
        "empty platform list {0:?}: name one or more platforms, comma-separated, from {accepted} (or leave the \
         flag out to build for this machine's platform)",
        accepted = SUPPORTED.join(", ")
    )]
    EmptyList(String),
    #[error("empty platform in the list {0:?}: remove the stray comma, or name a platform there")]
    BlankItem(String),
}

impl Platform {
    pub fn os(&self) -> &str {
        &self.os
    }

    pub fn architecture(&self) -> &str {
        &self.architecture
    }

    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }

    /// `(os, architecture, variant)`, as an OCI image index descriptor's `platform` wants them.
    pub fn oci_parts(&self) -> (&str, &str, Option<&str>) {
        (self.os(), self.architecture(), self.variant())
    }

    /// Parses a comma-separated list (`"linux/amd64, arm64"`), keeping the given order. Items
    /// are trimmed; a blank list or a blank item (`""`, `"linux/amd64,"`, `"a,,b"`) is an error,
    /// as is a list naming one platform twice (after normalisation): a list that quietly
    /// meant fewer platforms than it seemed to would build the wrong image.
    pub fn parse_list(s: &str) -> Result<Vec<Platform>, PlatformError> {
        if s.trim().is_empty() {
            return Err(PlatformError::EmptyList(s.to_owned()));
        }
        let mut seen: Vec<(Platform, &str)> = Vec::new();
        for item in s.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(PlatformError::BlankItem(s.to_owned()));
            }
            let platform: Platform = item.parse()?;
            if let Some((_, first)) = seen.iter().find(|(p, _)| *p == platform) {
                return Err(PlatformError::Duplicate {
                    platform: platform.to_string(),
                    first: (*first).to_owned(),
                    second: item.to_owned(),
                });
            }
            seen.push((platform, item));
        }
        Ok(seen.into_iter().map(|(p, _)| p).collect())
    }

    /// The suffix of QEMU's user-mode emulator for this platform (`qemu-<name>`).
    pub fn qemu_name(&self) -> &'static str {
        match self.architecture.as_str() {
            "amd64" => "x86_64",
            "386" => "i386",
            "arm64" => "aarch64",
            "arm" => "arm",
            "riscv64" => "riscv64",
            "ppc64le" => "ppc64le",
            "s390x" => "s390x",
            other => unreachable!("Platform holds only supported architectures, not {other:?}"),
        }
    }

    /// One of [`SUPPORTED`], for code in this crate that names platforms by their canonical form.
    pub(crate) fn known(canonical: &str) -> Platform {
        debug_assert!(SUPPORTED.contains(&canonical), "{canonical:?} is not SUPPORTED");
        canonical.parse().expect("every SUPPORTED platform parses (tested)")
    }
}

/// The canonical architecture behind a spelling, with the variant the spelling implies.
fn arch_alias(arch: &str) -> Option<(&'static str, Option<&'static str>)> {
    Some(match arch {
        "amd64" | "x86_64" | "x86-64" => ("amd64", None),
        "386" | "i386" | "i586" | "i686" => ("386", None),
        "arm64" | "aarch64" => ("arm64", None),
        "arm" => ("arm", None),
        "armhf" | "armv7" | "armv7l" => ("arm", Some("v7")),
        "armel" | "armv6" | "armv6l" => ("arm", Some("v6")),
        "riscv64" => ("riscv64", None),
        "ppc64le" => ("ppc64le", None),
        "s390x" => ("s390x", None),
        _ => return None,
    })
}

/// The supported (architecture, variant) for a lower-cased spelling, if there is one.
fn canonical(arch: &str, variant: Option<&str>) -> Option<(&'static str, Option<&'static str>)> {
    let (arch, implied) = arch_alias(arch)?;
    // containerd writes bare version numbers as variants: `arm/7` is `arm/v7`.
    let given =
        variant.map(|v| if v.starts_with(|c: char| c.is_ascii_digit()) { format!("v{v}") } else { v.to_owned() });
    let variant = match (implied, given.as_deref()) {
        (None, v) => v,
        (Some(i), None) => Some(i),
        (Some(i), Some(v)) if v == i => Some(i),
        _ => return None,
    };
    Some(match (arch, variant) {
        ("amd64", None | Some("v1")) => ("amd64", None),
        ("arm64", None | Some("v8" | "v8.0")) => ("arm64", None),
        ("arm", None | Some("v7")) => ("arm", Some("v7")),
        ("arm", Some("v6")) => ("arm", Some("v6")),
        (a @ ("386" | "riscv64" | "ppc64le" | "s390x"), None) => (a, None),
        _ => return None,
    })
}

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(input: &str) -> Result<Self, PlatformError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(PlatformError::Empty);
        }
        let lower = input.to_ascii_lowercase();
        let parts: Vec<&str> = lower.split('/').collect();
        let (os, rest) = match parts.split_first() {
            Some((os, rest)) if !rest.is_empty() && KNOWN_OS.contains(os) => (*os, rest),
            _ => ("linux", &parts[..]),
        };
        if os != "linux" {
            return Err(PlatformError::NotLinux { input: input.to_owned(), os: os.to_owned() });
        }
        let (arch, variant) = match rest {
            [arch] => (*arch, None),
            [arch, variant] => (*arch, Some(*variant)),
            _ => return Err(PlatformError::Unknown(input.to_owned())),
        };
        let (architecture, variant) =
            canonical(arch, variant).ok_or_else(|| PlatformError::Unknown(input.to_owned()))?;
        Ok(Platform {
            os: "linux".to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

impl Serialize for Platform {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Platform {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCEPTED: &str = "linux/amd64, linux/386, linux/arm64, linux/arm/v7, linux/arm/v6, \
                            linux/riscv64, linux/ppc64le, linux/s390x";

    fn parse(s: &str) -> Platform {
        s.parse().unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    #[test]
    fn every_supported_platform_round_trips() {
        for s in SUPPORTED {
            let p = parse(s);
            assert_eq!(p.to_string(), *s);
            assert_eq!(parse(&p.to_string()), p);
            assert_eq!(Platform::known(s), p);
        }
    }

    #[test]
    fn accepted_spellings_normalise() {
        let cases: &[(&str, &[&str])] = &[
            (
                "linux/amd64",
                &[
                    "amd64",
                    "x86_64",
                    "x86-64",
                    "linux/x86_64",
                    "linux/x86-64",
                    "linux/amd64/v1",
                    "amd64/v1",
                    "LINUX/AMD64",
                    "Linux/X86_64",
                    "  linux/amd64  ",
                ],
            ),
            ("linux/386", &["386", "i386", "i686", "i586", "linux/i386", "linux/i686", "linux/i586"]),
            (
                "linux/arm64",
                &[
                    "arm64",
                    "aarch64",
                    "AArch64",
                    "linux/aarch64",
                    "linux/arm64/v8",
                    "linux/arm64/v8.0",
                    "linux/arm64/8",
                    "linux/aarch64/v8",
                    "arm64/v8",
                    "arm64/8",
                ],
            ),
            (
                "linux/arm/v7",
                &[
                    "arm",
                    "linux/arm",
                    "linux/arm/7",
                    "linux/arm/V7",
                    "arm/v7",
                    "armhf",
                    "linux/armhf",
                    "armv7",
                    "armv7l",
                    "linux/armv7l",
                    "linux/armv7l/v7",
                ],
            ),
            ("linux/arm/v6", &["linux/arm/6", "arm/v6", "armel", "linux/armel", "armv6", "armv6l", "linux/armv6l"]),
            ("linux/riscv64", &["riscv64", "RISCV64"]),
            ("linux/ppc64le", &["ppc64le", "PPC64LE"]),
            ("linux/s390x", &["s390x", "S390X"]),
        ];
        for (canonical, spellings) in cases {
            for s in *spellings {
                assert_eq!(parse(s).to_string(), *canonical, "{s:?}");
            }
        }
    }

    #[test]
    fn accessors_and_oci_parts() {
        let p = parse("armhf");
        assert_eq!((p.os(), p.architecture(), p.variant()), ("linux", "arm", Some("v7")));
        assert_eq!(p.oci_parts(), ("linux", "arm", Some("v7")));
        assert_eq!(parse("aarch64").oci_parts(), ("linux", "arm64", None));
    }

    #[test]
    fn qemu_names() {
        let expected = [
            ("linux/amd64", "x86_64"),
            ("linux/386", "i386"),
            ("linux/arm64", "aarch64"),
            ("linux/arm/v7", "arm"),
            ("linux/arm/v6", "arm"),
            ("linux/riscv64", "riscv64"),
            ("linux/ppc64le", "ppc64le"),
            ("linux/s390x", "s390x"),
        ];
        assert_eq!(expected.len(), SUPPORTED.len());
        for (p, q) in expected {
            assert_eq!(parse(p).qemu_name(), q, "{p}");
        }
    }

    #[test]
    fn error_messages_list_the_accepted_forms() {
        assert_eq!(SUPPORTED.join(", "), ACCEPTED);
        let err = "linux/mips".parse::<Platform>().unwrap_err();
        assert_eq!(err, PlatformError::Unknown("linux/mips".into()));
        assert_eq!(err.to_string(), format!("unknown platform \"linux/mips\": farm builds for {ACCEPTED}"));
        assert_eq!(
            "windows/amd64".parse::<Platform>().unwrap_err().to_string(),
            format!(
                "unsupported operating system \"windows\" in \"windows/amd64\": \
                 farm builds Linux images only ({ACCEPTED})"
            )
        );
        assert_eq!(
            "".parse::<Platform>().unwrap_err().to_string(),
            format!("empty platform: farm builds for {ACCEPTED}")
        );
    }

    #[test]
    fn unsupported_platforms_are_refused() {
        for s in [
            "linux/arm/v5",
            "arm/v5",
            "linux/arm/v8",
            "linux/amd64/v3",
            "linux/amd64/v2",
            "linux/arm64/v9",
            "linux/386/v1",
            "linux/armhf/v6",
            "linux/armel/v7",
            "linux/mips",
            "linux/mips64le",
            "linux/riscv32",
            "linux/ppc64",
            "mips",
            "linux",
            "linux/",
            "linux//",
            "linux/arm/",
            "/amd64",
            "a/b/c/d",
            "linux/arm/v7/x",
            "foo/amd64",
        ] {
            let err = s.parse::<Platform>().unwrap_err();
            assert_eq!(err, PlatformError::Unknown(s.into()), "{s:?}");
            assert!(err.to_string().ends_with(ACCEPTED), "{err}");
        }
        for (s, os) in [
            ("windows/amd64", "windows"),
            ("darwin/arm64", "darwin"),
            ("FreeBSD/amd64", "freebsd"),
            ("windows/mips/v9", "windows"),
        ] {
            assert_eq!(s.parse::<Platform>().unwrap_err(), PlatformError::NotLinux { input: s.into(), os: os.into() });
        }
        for s in ["", "   "] {
            assert_eq!(s.parse::<Platform>().unwrap_err(), PlatformError::Empty);
        }
    }

    #[test]
    fn parse_list_trims_and_keeps_order() {
        let list = Platform::parse_list(" linux/arm64 ,amd64, armhf ").unwrap();
        let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["linux/arm64", "linux/amd64", "linux/arm/v7"]);
        assert_eq!(Platform::parse_list(&SUPPORTED.join(",")).unwrap().len(), SUPPORTED.len());
    }

    #[test]
    fn parse_list_refuses_blank_lists_and_blank_items() {
        for blank in ["", " ", " , ,"] {
            let err = Platform::parse_list(blank).unwrap_err();
            let want = if blank.trim().is_empty() && !blank.contains(',') {
                PlatformError::EmptyList(blank.into())
            } else {
                PlatformError::BlankItem(blank.into())
            };
            assert_eq!(err, want, "{blank:?}");
        }
        assert_eq!(
            Platform::parse_list("").unwrap_err().to_string(),
            format!(
                "empty platform list \"\": name one or more platforms, comma-separated, from {} (or leave the flag out \
                 to build for this machine's platform)",
                SUPPORTED.join(", ")
            )
        );
        for stray in ["linux/amd64,", ",linux/amd64", "amd64,,arm64", "amd64, ,arm64"] {
            assert_eq!(Platform::parse_list(stray).unwrap_err(), PlatformError::BlankItem(stray.into()), "{stray:?}");
        }
        assert_eq!(
            Platform::parse_list("linux/amd64,").unwrap_err().to_string(),
            "empty platform in the list \"linux/amd64,\": remove the stray comma, or name a platform there"
        );
    }

    #[test]
    fn parse_list_rejects_duplicates_after_normalisation() {
        let err = Platform::parse_list("linux/arm/v7, linux/amd64, armhf").unwrap_err();
        assert_eq!(
            err,
            PlatformError::Duplicate {
                platform: "linux/arm/v7".into(),
                first: "linux/arm/v7".into(),
                second: "armhf".into(),
            }
        );
        assert_eq!(err.to_string(), "platform linux/arm/v7 is listed twice (as \"linux/arm/v7\" and \"armhf\")");
        assert!(matches!(Platform::parse_list("amd64,amd64"), Err(PlatformError::Duplicate { .. })));
    }

    #[test]
    fn parse_list_reports_the_bad_item() {
        assert_eq!(
            Platform::parse_list("linux/amd64, linux/mips").unwrap_err(),
            PlatformError::Unknown("linux/mips".into())
        );
    }

    #[test]
    fn serde_uses_the_canonical_string() {
        let list = Platform::parse_list("aarch64, armhf, x86_64").unwrap();
        let json = serde_json::to_string(&list).unwrap();
        assert_eq!(json, r#"["linux/arm64","linux/arm/v7","linux/amd64"]"#);
        assert_eq!(serde_json::from_str::<Vec<Platform>>(&json).unwrap(), list);
        // Deserialising normalises too, and refuses what parsing refuses.
        assert_eq!(serde_json::from_str::<Platform>(r#""ARM64/v8""#).unwrap(), parse("linux/arm64"));
        let err = serde_json::from_str::<Platform>(r#""linux/mips""#).unwrap_err();
        assert!(err.to_string().contains("unknown platform"), "{err}");

        let p = parse("linux/arm/v7");
        let bytes = postcard::to_allocvec(&p).unwrap();
        assert_eq!(bytes[0] as usize, "linux/arm/v7".len());
        assert_eq!(&bytes[1..], b"linux/arm/v7");
        assert_eq!(postcard::from_bytes::<Platform>(&bytes).unwrap(), p);
    }
}
