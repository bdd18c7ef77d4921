//! Memory the host hands over: where it may lie, and how ownership of it passes to us (the
//! soundness argument the parent module's header refers to).
use super::Status;

/// Whether `size` bytes at `data` lie inside the module's linear memory (the host is trusted
/// to hand over memory it got from `proxy_on_memory_allocate`; this catches a host that
/// points anywhere else before any byte is read).
#[cfg(target_arch = "wasm32")]
fn in_linear_memory(data: *const u8, size: usize) -> bool {
    let memory = core::arch::wasm32::memory_size::<0>().saturating_mul(65536);
    (data as usize)
        .checked_add(size)
        .is_some_and(|end| end <= memory)
}

#[cfg(not(target_arch = "wasm32"))]
fn in_linear_memory(_data: *const u8, _size: usize) -> bool {
    true
}

/// Takes ownership of the `size` bytes the host returned at `data`.
///
/// # Safety
/// `data` is null, or it is the pointer this module's `proxy_on_memory_allocate(size)`
/// returned to the host during the call that produced it, for this same `size`, the host
/// copied `size` bytes into it, and nothing else owns it: the ABI's contract for every
/// `return_*_data`/`return_*_size` pair (module header).
///
/// Why `Vec::from_raw_parts(data, size, size)` is then sound: the memory was allocated by the
/// global allocator (a `Vec<MaybeUninit<u8>>` with capacity `size`, boxed without
/// reallocating), so with the layout of `size` `u8`s (alignment 1), which is what a
/// `Vec<u8>` of capacity `size` frees; the `size` bytes are initialised (the host wrote all of
/// them); and the host keeps no pointer to it, so the `Vec` is its only owner.
pub(super) unsafe fn take(data: *mut u8, size: usize) -> Result<Vec<u8>, Status> {
    if data.is_null() || size == 0 {
        // Nothing allocated: the host allocates only for non-empty values (and
        // `proxy_on_memory_allocate(0)` returns a dangling pointer of an empty box, which owns
        // nothing).
        return Ok(Vec::new());
    }
    if !in_linear_memory(data, size) {
        return Err(Status::INVALID_MEMORY_ACCESS);
    }
    // SAFETY: the function's contract, explained above.
    Ok(unsafe { Vec::from_raw_parts(data, size, size) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_owns_what_the_allocator_gave() {
        // What the SDK's proxy_on_memory_allocate does, then the host's copy.
        let size = 5;
        let mut block: Vec<std::mem::MaybeUninit<u8>> = Vec::with_capacity(size);
        block.resize(size, std::mem::MaybeUninit::new(0));
        let ptr = Box::into_raw(block.into_boxed_slice()).cast::<u8>();
        unsafe { std::ptr::copy_nonoverlapping(b"hello".as_ptr(), ptr, size) };
        assert_eq!(unsafe { take(ptr, size) }.unwrap(), b"hello");
        assert_eq!(unsafe { take(std::ptr::null_mut(), 0) }.unwrap(), b"");
        assert_eq!(unsafe { take(std::ptr::null_mut(), 7) }.unwrap(), b"");
    }
}
