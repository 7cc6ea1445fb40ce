//! The per-task maps of an object built for kernels without task-local
//! storage (before 5.11), standing in for `task_storage.rs`: the same calls,
//! always finding nothing, and no map in the object for the kernel to refuse.
//! Userspace loads such an object with its `USE_HASH` global set, so the
//! programs keep their values in the hashes by tid instead.

/// Declares the per-task name `NAME: T`: here, no map.
macro_rules! per_task_map {
    ($(#[$attr:meta])* $name:ident: $t:ty) => {
        $(#[$attr])*
        #[allow(dead_code, reason = "no map behind it: nothing reads it but the unused task-storage path")]
        static $name: $crate::task_storage::Absent<$t> = $crate::task_storage::Absent::new();
    };
}

/// What a per-task map is in an object built without task storage: the same
/// calls, always finding nothing, and no map in the object.
pub struct Absent<T>(core::marker::PhantomData<T>);

// SAFETY: holds nothing.
unsafe impl<T> Sync for Absent<T> {}

impl<T> Absent<T> {
    pub const fn new() -> Self {
        Self(core::marker::PhantomData)
    }

    /// Nothing: userspace uses the hash store with this object.
    #[inline(always)]
    #[allow(dead_code, reason = "the scheduler commands' object uses `get` only")]
    #[allow(clippy::mut_from_ref, reason = "the same signature as TaskStorage::current, which callers share")]
    pub fn current(&self, _create: bool) -> Option<&mut T> {
        None
    }

    /// Nothing, as `current`.
    ///
    /// # Safety
    /// None needed; `unsafe` as `TaskStorage::get`, which callers share.
    #[inline(always)]
    #[expect(clippy::mut_from_ref, reason = "the same signature as TaskStorage::get, which callers share")]
    pub unsafe fn get(&self, _task: *mut core::ffi::c_void, _create: bool) -> Option<&mut T> {
        None
    }
}
