//! `Platform::from_str` and `Platform::parse_list` on arbitrary strings (user flags, config files,
//! uname output and, through serde, the wire). Whatever is accepted must be one of `SUPPORTED`,
//! round-trip through `Display`, and deserialise to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::platform::{PlatformError, SUPPORTED};
use shared::proto::{decode, encode};
use shared::Platform;

fn check_one(s: &str) {
    let parsed = s.parse::<Platform>();
    // Serde (the wire, JSON config) goes through the same parser.
    let wire = encode(&s, usize::MAX).expect("a string always encodes");
    match (&parsed, decode::<Platform>(&wire[4..])) {
        (Ok(a), Ok(b)) => assert_eq!(*a, b, "{s:?}"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("{s:?}: from_str gave {a:?} but deserialising gave {b:?}"),
    }
    // Case is not significant (ASCII only), and neither is surrounding whitespace.
    assert_eq!(parsed.as_ref().ok(), s.to_ascii_uppercase().parse::<Platform>().as_ref().ok(), "{s:?}");
    assert_eq!(parsed.as_ref().ok(), format!(" \t{s}\n ").parse::<Platform>().as_ref().ok(), "{s:?}");
    match parsed {
        Ok(p) => {
            let shown = p.to_string();
            assert!(SUPPORTED.contains(&shown.as_str()), "{s:?} parsed to unsupported {shown:?}");
            assert_eq!(shown.parse::<Platform>().as_ref(), Ok(&p), "{s:?} -> {shown:?} does not round-trip");
            let (os, arch, variant) = p.oci_parts();
            let joined = match variant {
                Some(v) => format!("{os}/{arch}/{v}"),
                None => format!("{os}/{arch}"),
            };
            assert_eq!(joined, shown);
            let _ = p.qemu_name(); // unreachable!() for anything outside SUPPORTED
            let json_like = encode(&p, usize::MAX).unwrap();
            assert_eq!(decode::<Platform>(&json_like[4..]).ok().as_ref(), Some(&p));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            if s.trim().is_empty() {
                assert_eq!(e, PlatformError::Empty);
            }
        }
    }
}

fn check_list(s: &str) {
    let Ok(list) = Platform::parse_list(s) else { return };
    for (i, p) in list.iter().enumerate() {
        assert!(SUPPORTED.contains(&p.to_string().as_str()), "{s:?}: {p}");
        assert!(!list[..i].contains(p), "{s:?}: {p} listed twice");
    }
    let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
    let again = Platform::parse_list(&shown.join(",")).expect("a parsed list's display parses");
    assert_eq!(again, list, "{s:?}");
    // Every item parses on its own, to the value at its position (a blank one is refused).
    let items: Vec<&str> = s.split(',').map(str::trim).collect();
    assert_eq!(items.len(), list.len(), "{s:?}");
    for (item, p) in items.iter().zip(&list) {
        assert_eq!(item.parse::<Platform>().as_ref(), Ok(p), "{s:?}: item {item:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    check_one(&s);
    check_list(&s);
    // Each comma-separated piece alone too, so that the fuzzer's list inputs exercise single parses.
    for item in s.split(',') {
        check_one(item);
    }
});
