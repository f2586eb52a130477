//! An agent must advertise exactly what it can build, natively and through QEMU, or the coordinator
//! will send it jobs that fail minutes in with `exec format error`. The facts live in `uname`,
//! /proc/cpuinfo and binfmt_misc, whose spellings vary by distribution and kernel; interpreting
//! them is kept in pure functions so every quirk is pinned by a unit test, and only [`detect`]
//! touches the real machine.

use std::fs;
use std::path::Path;

use crate::platform::{Platform, SUPPORTED};

/// Where the kernel exposes binfmt_misc handlers.
pub const DEFAULT_BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// What this machine can build: natively, and through QEMU user-mode emulation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPlatforms {
    pub native: Vec<Platform>,
    pub emulated: Vec<Platform>,
}

/// One binfmt_misc handler, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinfmtHandler {
    pub name: String,
    pub enabled: bool,
    pub interpreter: String,
    pub flags: String,
}

/// Parses the text of one `/proc/sys/fs/binfmt_misc/<name>` file
/// (`"enabled\ninterpreter /usr/bin/qemu-aarch64-static\nflags: PF\noffset 0\nmagic 7f45…"`).
/// `None` if it lacks the enabled/disabled line or the interpreter (it is not a handler).
pub fn parse_binfmt_entry(name: &str, text: &str) -> Option<BinfmtHandler> {
    let mut enabled = None;
    let mut interpreter = None;
    let mut flags = String::new();
    for line in text.lines().map(str::trim) {
        match line {
            "enabled" => enabled = Some(true),
            "disabled" => enabled = Some(false),
            _ => {
                if let Some(path) = line.strip_prefix("interpreter ") {
                    interpreter = Some(path.trim().to_owned());
                } else if let Some(f) = line.strip_prefix("flags:") {
                    flags = f.trim().to_owned();
                }
            }
        }
    }
    Some(BinfmtHandler {
        name: name.to_owned(),
        enabled: enabled?,
        interpreter: interpreter.filter(|i| !i.is_empty())?,
        flags,
    })
}

/// Native platforms from the kernel's machine name (`uname -m`), the text of /proc/cpuinfo, and
/// whether the kernel accepts 32-bit ARM processes (only meaningful on aarch64).
pub fn native_platforms(machine: &str, cpuinfo: &str, aarch32: bool) -> Vec<Platform> {
    const ARM32: &[&str] = &["linux/arm/v7", "linux/arm/v6"];
    let names: &[&str] = match machine.trim() {
        "x86_64" => &["linux/amd64", "linux/386"],
        "i686" | "i386" => &["linux/386"],
        "aarch64" | "arm64" if aarch32 => &["linux/arm64", "linux/arm/v7", "linux/arm/v6"],
        "aarch64" | "arm64" => &["linux/arm64"],
        "armv7l" | "armv8l" => ARM32,
        "armv6l" => &["linux/arm/v6"],
        m if m.starts_with("arm") => match cpuinfo_arm_version(cpuinfo) {
            Some(v) if v >= 7 => ARM32,
            Some(6) => &["linux/arm/v6"],
            _ => &[],
        },
        "riscv64" => &["linux/riscv64"],
        "ppc64le" => &["linux/ppc64le"],
        "s390x" => &["linux/s390x"],
        _ => &[],
    };
    names.iter().copied().map(Platform::known).collect()
}

/// The leading number of cpuinfo's "CPU architecture:" field (`7`, or `5TEJ` on old kernels).
fn cpuinfo_arm_version(cpuinfo: &str) -> Option<u32> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.trim() != "CPU architecture" {
            return None;
        }
        let value = value.trim();
        let digits = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
        value[..digits].parse().ok()
    })
}

/// Platforms that enabled QEMU handlers let this host run, minus those it runs natively; sorted in
/// [`SUPPORTED`] order, without duplicates.
pub fn emulated_platforms(handlers: &[BinfmtHandler], native: &[Platform]) -> Vec<Platform> {
    let qemu: Vec<&str> = handlers.iter().filter(|h| h.enabled).filter_map(qemu_target).collect();
    SUPPORTED
        .iter()
        .copied()
        .map(Platform::known)
        .filter(|p| qemu.contains(&p.qemu_name()) && !native.contains(p))
        .collect()
}

/// The QEMU target a handler runs (`aarch64`), from its interpreter (`qemu-aarch64[-static]`, or
/// Debian's `aarch64-binfmt-P`) or, failing that, its name (`qemu-aarch64`).
fn qemu_target(h: &BinfmtHandler) -> Option<&str> {
    let base = Path::new(&h.interpreter).file_name()?.to_str()?;
    let base = base.strip_suffix("-static").unwrap_or(base);
    base.strip_prefix("qemu-").or_else(|| base.strip_suffix("-binfmt-P")).or_else(|| h.name.strip_prefix("qemu-"))
}

/// Reads the real machine: libc::uname, /proc/cpuinfo, the AArch32 probe on aarch64, and every
/// handler in `binfmt_dir` (normally [`DEFAULT_BINFMT_DIR`]). A missing or disabled binfmt_misc
/// means no emulated platforms, not an error.
pub fn detect(binfmt_dir: &Path) -> HostPlatforms {
    let machine = uname_machine().unwrap_or_default();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let native = native_platforms(&machine, &cpuinfo, aarch32_supported());
    let emulated = emulated_platforms(&read_binfmt_dir(binfmt_dir), &native);
    HostPlatforms { native, emulated }
}

/// Every handler in a binfmt_misc directory; none if the facility is globally disabled.
fn read_binfmt_dir(dir: &Path) -> Vec<BinfmtHandler> {
    if fs::read_to_string(dir.join("status")).is_ok_and(|s| s.trim() == "disabled") {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            if name == "register" || name == "status" {
                return None;
            }
            parse_binfmt_entry(&name, &fs::read_to_string(entry.path()).ok()?)
        })
        .collect()
}

/// The kernel's machine name, as `uname -m` prints it.
fn uname_machine() -> Option<String> {
    // SAFETY: utsname is plain C character arrays, for which all-zero bytes are valid.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname for the duration of the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = uts.machine.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Whether this aarch64 kernel runs 32-bit ARM processes.
///
/// It is probed rather than assumed because AArch32 at EL0 is optional in ARMv8: AWS Graviton 3
/// and several recent Cortex/Neoverse cores have none, and kernels may be built without
/// `CONFIG_COMPAT`. On such hosts `personality(PER_LINUX32)` fails with `EINVAL`, and advertising
/// linux/arm/v7 natively would land jobs that die with `exec format error`.
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
fn aarch32_supported() -> bool {
    const PER_LINUX32: libc::c_ulong = 0x0008;
    // SAFETY: personality only changes this thread's execution domain, and it is restored below
    // before anything else runs in this thread.
    let prev = unsafe { libc::personality(PER_LINUX32) };
    if prev == -1 {
        return false;
    }
    // SAFETY: as above; `prev` is the persona the kernel just reported.
    unsafe { libc::personality(prev as libc::c_ulong) };
    true
}

/// Only aarch64 kernels can run AArch32 processes alongside native ones.
#[cfg(not(all(target_os = "linux", target_arch = "aarch64")))]
fn aarch32_supported() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platforms(list: &[&str]) -> Vec<Platform> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn handler(name: &str, enabled: bool, interpreter: &str) -> BinfmtHandler {
        BinfmtHandler { name: name.into(), enabled, interpreter: interpreter.into(), flags: "F".into() }
    }

    const QEMU_AARCH64: &str = "enabled\n\
        interpreter /usr/bin/qemu-aarch64-static\n\
        flags: PF\n\
        offset 0\n\
        magic 7f454c460201010000000000000000000200b700\n\
        mask ffffffffffffff00fffffffffffffffffeffffff\n";

    const DEBIAN_ARM: &str = "disabled\n\
        interpreter /usr/libexec/qemu-binfmt/arm-binfmt-P\n\
        flags: POCF\n\
        offset 0\n\
        magic 7f454c4601010100000000000000000002002800\n\
        mask ffffffffffffff00fffffffffffffffffeffffff\n";

    const RPI_CPUINFO: &str = "processor\t: 0\n\
        model name\t: ARMv7 Processor rev 4 (v7l)\n\
        BogoMIPS\t: 38.40\n\
        Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32\n\
        CPU implementer\t: 0x41\n\
        CPU architecture: 7\n\
        CPU variant\t: 0x0\n";

    #[test]
    fn native_x86() {
        assert_eq!(native_platforms("x86_64", "", false), platforms(&["linux/amd64", "linux/386"]));
        assert_eq!(native_platforms("x86_64\n", "", true).len(), 2);
        assert_eq!(native_platforms("i686", "", false), platforms(&["linux/386"]));
        assert_eq!(native_platforms("i386", "", false), platforms(&["linux/386"]));
    }

    #[test]
    fn native_aarch64_depends_on_aarch32() {
        assert_eq!(native_platforms("aarch64", "", true), platforms(&["linux/arm64", "linux/arm/v7", "linux/arm/v6"]));
        assert_eq!(native_platforms("aarch64", "", false), platforms(&["linux/arm64"]));
        assert_eq!(native_platforms("arm64", "", false), platforms(&["linux/arm64"]));
    }

    #[test]
    fn native_32_bit_arm() {
        let arm32 = platforms(&["linux/arm/v7", "linux/arm/v6"]);
        assert_eq!(native_platforms("armv7l", "", false), arm32);
        assert_eq!(native_platforms("armv8l", "", false), arm32);
        assert_eq!(native_platforms("armv6l", "", false), platforms(&["linux/arm/v6"]));
    }

    #[test]
    fn native_arm_falls_back_to_cpuinfo() {
        let arm32 = platforms(&["linux/arm/v7", "linux/arm/v6"]);
        assert_eq!(native_platforms("armv7b", RPI_CPUINFO, false), arm32);
        assert_eq!(native_platforms("arm", "CPU architecture: 8\n", false), arm32);
        assert_eq!(native_platforms("armv6b", "CPU architecture: 6TEJ\n", false), platforms(&["linux/arm/v6"]));
        assert_eq!(native_platforms("armv5tel", "CPU architecture: 5TEJ\n", false), []);
        assert_eq!(native_platforms("arm", "", false), []);
    }

    #[test]
    fn native_other_architectures() {
        for m in ["riscv64", "ppc64le", "s390x"] {
            assert_eq!(native_platforms(m, "", false), platforms(&[format!("linux/{m}").as_str()]));
        }
        for m in ["mips", "ppc64", "sparc64", "loongarch64", ""] {
            assert_eq!(native_platforms(m, "", false), [], "{m:?}");
        }
    }

    #[test]
    fn parses_binfmt_entries() {
        assert_eq!(
            parse_binfmt_entry("qemu-aarch64", QEMU_AARCH64),
            Some(BinfmtHandler {
                name: "qemu-aarch64".into(),
                enabled: true,
                interpreter: "/usr/bin/qemu-aarch64-static".into(),
                flags: "PF".into(),
            })
        );
        assert_eq!(
            parse_binfmt_entry("qemu-arm", DEBIAN_ARM),
            Some(BinfmtHandler {
                name: "qemu-arm".into(),
                enabled: false,
                interpreter: "/usr/libexec/qemu-binfmt/arm-binfmt-P".into(),
                flags: "POCF".into(),
            })
        );
        let no_flags =
            parse_binfmt_entry("qemu-riscv64", "enabled\ninterpreter /usr/bin/qemu-riscv64\nflags: \noffset 0\n")
                .unwrap();
        assert_eq!(no_flags.flags, "");
        assert!(no_flags.enabled);
    }

    #[test]
    fn non_handlers_are_not_parsed() {
        assert_eq!(parse_binfmt_entry("status", "enabled\n"), None);
        assert_eq!(parse_binfmt_entry("x", ""), None);
        assert_eq!(parse_binfmt_entry("x", "interpreter /usr/bin/qemu-arm\n"), None);
    }

    #[test]
    fn emulated_on_x86_with_qemu_aarch64_and_arm() {
        let native = native_platforms("x86_64", "", false);
        let handlers = [
            handler("qemu-arm", true, "/usr/bin/qemu-arm-static"),
            handler("qemu-aarch64", true, "/usr/bin/qemu-aarch64-static"),
        ];
        assert_eq!(emulated_platforms(&handlers, &native), platforms(&["linux/arm64", "linux/arm/v7", "linux/arm/v6"]));
    }

    #[test]
    fn emulated_interpreter_styles() {
        let cases = [
            (handler("qemu-aarch64", true, "/usr/bin/qemu-aarch64"), "linux/arm64"),
            (handler("aarch64", true, "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"), "linux/arm64"),
            (handler("qemu-riscv64", true, "/usr/bin/some-wrapper"), "linux/riscv64"),
            (handler("qemu-ppc64le", true, "qemu-ppc64le-static"), "linux/ppc64le"),
            (handler("s390x", true, "/opt/qemu/bin/qemu-s390x"), "linux/s390x"),
            (handler("qemu-i386", true, "/usr/bin/qemu-i386-static"), "linux/386"),
        ];
        for (h, expected) in cases {
            assert_eq!(emulated_platforms(std::slice::from_ref(&h), &[]), platforms(&[expected]), "{h:?}");
        }
    }

    #[test]
    fn emulated_ignores_disabled_unknown_and_native() {
        let native = native_platforms("x86_64", "", false);
        let disabled = [
            handler("qemu-aarch64", false, "/usr/bin/qemu-aarch64-static"),
            handler("qemu-arm", false, "/usr/libexec/qemu-binfmt/arm-binfmt-P"),
        ];
        assert_eq!(emulated_platforms(&disabled, &native), []);
        let unknown = [
            handler("qemu-armeb", true, "/usr/bin/qemu-armeb-static"),
            handler("qemu-mips", true, "/usr/bin/qemu-mips-static"),
            handler("python3.11", true, "/usr/bin/python3.11"),
            handler("box64", true, "/usr/local/bin/box64"),
        ];
        assert_eq!(emulated_platforms(&unknown, &native), []);
        let own = [
            handler("qemu-x86_64", true, "/usr/bin/qemu-x86_64-static"),
            handler("qemu-i386", true, "/usr/bin/qemu-i386-static"),
        ];
        assert_eq!(emulated_platforms(&own, &native), []);
    }

    #[test]
    fn emulated_is_sorted_and_deduplicated() {
        let handlers = [
            handler("qemu-s390x", true, "/usr/bin/qemu-s390x-static"),
            handler("qemu-aarch64", true, "/usr/bin/qemu-aarch64-static"),
            handler("aarch64", true, "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"),
            handler("qemu-x86_64", true, "/usr/bin/qemu-x86_64"),
        ];
        let native = native_platforms("aarch64", "", true);
        assert_eq!(emulated_platforms(&handlers, &native), platforms(&["linux/amd64", "linux/s390x"]));
    }

    fn fake_binfmt_dir(status: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).unwrap();
        write("status", status);
        write("register", "");
        write("qemu-aarch64", QEMU_AARCH64);
        write("qemu-arm", &DEBIAN_ARM.replacen("disabled", "enabled", 1));
        write("qemu-riscv64", "disabled\ninterpreter /usr/bin/qemu-riscv64-static\nflags: F\n");
        write("qemu-x86_64", "enabled\ninterpreter /usr/bin/qemu-x86_64-static\nflags: F\n");
        dir
    }

    #[test]
    fn reads_a_binfmt_dir() {
        let dir = fake_binfmt_dir("enabled\n");
        let mut names: Vec<String> = read_binfmt_dir(dir.path()).into_iter().map(|h| h.name).collect();
        names.sort();
        assert_eq!(names, ["qemu-aarch64", "qemu-arm", "qemu-riscv64", "qemu-x86_64"]);

        let host = detect(dir.path());
        let expected: Vec<Platform> = platforms(&["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm/v6"])
            .into_iter()
            .filter(|p| !host.native.contains(p))
            .collect();
        assert_eq!(host.emulated, expected);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(host.native, platforms(&["linux/amd64", "linux/386"]));
    }

    #[test]
    fn globally_disabled_binfmt_emulates_nothing() {
        let dir = fake_binfmt_dir("disabled\n");
        assert_eq!(read_binfmt_dir(dir.path()), []);
        assert_eq!(detect(dir.path()).emulated, []);
    }

    #[test]
    fn missing_binfmt_dir_emulates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("binfmt_misc");
        assert_eq!(read_binfmt_dir(&missing), []);
        let host = detect(&missing);
        assert_eq!(host.emulated, []);
        assert_eq!(host, detect(&missing), "detection is deterministic");
    }
}
