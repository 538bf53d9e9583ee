//! The memory routines that compiled Rust code calls (`memcpy` and friends). There is no
//! C library in the image: glibc's static versions resolve through IFUNC relocations,
//! which need a loader this guest does not have.
//!
//! Copies and fills use `rep movsb`/`rep stosb` (fast on every CPU with ERMSB, and
//! written in assembly so the compiler cannot turn them back into calls to themselves).

use core::arch::asm;

/// # Safety
///
/// `dest` and `src` are valid for `n` bytes and do not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller promises both ranges are valid for `n` bytes; DF is clear
    // (the ABI requires it at every call).
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// # Safety
///
/// `dest` and `src` are valid for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // `dest` is below `src` or past its end: a forward copy never reads a byte it
        // has already overwritten.
        // SAFETY: as promised by the caller, and the forward copy is safe for this
        // overlap as argued above.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: the caller promises both ranges are valid for `n` bytes (n > 0 here, as
    // `dest - src < n`). The copy runs backwards from the last byte (DF set), which is
    // safe when `dest` is above `src`; DF is cleared again, as the ABI requires.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        );
    }
    dest
}

/// # Safety
///
/// `dest` is valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller promises `dest` is valid for `n` bytes; DF is clear.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") value as u8,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// # Safety
///
/// `a` and `b` are valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: `i < n` and the caller promises both ranges are valid for `n` bytes.
        // Volatile reads keep the compiler from turning this loop into a call to
        // `memcmp` or `bcmp` (this very function).
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
///
/// `a` and `b` are valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as `memcmp`.
    unsafe { memcmp(a, b, n) }
}
