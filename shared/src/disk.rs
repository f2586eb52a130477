//! Disk space: how much a directory's file system has free (`statvfs`), whether an error is a
//! full disk, and the arithmetic of "does this fit" (pure), so that a full disk is refused with
//! how much more is needed instead of failing half way through a write.

use std::path::Path;

/// Space left free after a store's writes: the coordinator's database and temporary files need
/// room too, so a context is not accepted into the last few megabytes.
pub const RESERVE_BYTES: u64 = 4 << 20;

const MB: u64 = 1 << 20;

/// Bytes an unprivileged writer can still use on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Whether `e` says the disk (or the user's quota) is full.
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) || e.kind() == std::io::ErrorKind::StorageFull
}

/// How many bytes are missing for `needed` more bytes to fit in `free` with [`RESERVE_BYTES`]
/// left over; `None` if they fit.
pub fn shortfall(needed: u64, free: u64) -> Option<u64> {
    let want = needed.saturating_add(RESERVE_BYTES);
    (want > free).then(|| want - free)
}

/// Bytes as whole megabytes (MiB), rounded up: "needs 1 MB more" is never "needs 0 MB more".
pub fn mb_up(bytes: u64) -> u64 {
    bytes.div_ceil(MB)
}

/// Bytes as whole megabytes (MiB), rounded down (for what is free).
pub fn mb_down(bytes: u64) -> u64 {
    bytes / MB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortfall_counts_the_reserve_and_rounds_up() {
        assert_eq!(shortfall(10 * MB, 100 * MB), None);
        assert_eq!(shortfall(40 * MB, 20 * MB), Some(20 * MB + RESERVE_BYTES));
        assert_eq!(shortfall(0, RESERVE_BYTES), None);
        assert_eq!(shortfall(1, RESERVE_BYTES), Some(1));
        assert_eq!(mb_up(1), 1);
        assert_eq!(mb_up(0), 0);
        assert_eq!(mb_up(MB + 1), 2);
        assert_eq!(mb_down(MB * 2 - 1), 1);
    }

    #[test]
    fn enospc_is_no_space_and_other_errors_are_not() {
        assert!(is_no_space(&std::io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(is_no_space(&std::io::Error::from_raw_os_error(libc::EDQUOT)));
        assert!(!is_no_space(&std::io::Error::from_raw_os_error(libc::EIO)));
        assert!(free_bytes(Path::new("/")).is_ok());
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }
}
