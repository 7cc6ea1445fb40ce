//! A BTF-defined `BPF_MAP_TYPE_TASK_STORAGE` map, which aya-ebpf 0.2 lacks,
//! and its stand-in for objects built for kernels without one.
//!
//! Task-local storage hangs a value off each `task_struct`: lookups take no
//! lock shared with other tasks (unlike a hash map keyed by tid, whose bucket
//! locks are the contention a tracer must not add), values follow the task
//! across CPUs and sleeps, and they are freed when the task exits. Needs 5.11+.
//!
//! A kernel before 5.11 refuses to create the map, and the loader creates
//! every map of an object, so each object that uses task storage is built
//! twice: with this module, or with `no_task_storage.rs` in its place, whose
//! `per_task_map!` declares no map (userspace then sets the object's
//! `USE_HASH` global, and the hashes by tid hold the values).

use core::ptr;

use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE, BPF_F_NO_PREALLOC},
    helpers::generated::{bpf_get_current_task_btf, bpf_task_storage_get},
};

/// Same layout as libbpf's `__uint(type, …)`/`__type(key, …)` map
/// definitions: each field's pointee type encodes one attribute in BTF.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are placeholders the loader reads from BTF; they are
// never dereferenced.
unsafe impl<T> Sync for TaskStorage<T> {}

/// Declares the per-task map `NAME: T`: here, a task-storage map.
macro_rules! per_task_map {
    ($(#[$attr:meta])* $name:ident: $t:ty) => {
        $(#[$attr])*
        #[aya_ebpf::macros::btf_map]
        static $name: $crate::task_storage::TaskStorage<$t> = $crate::task_storage::TaskStorage::new();
    };
}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self { r#type: ptr::null(), key: ptr::null(), value: ptr::null(), map_flags: ptr::null() }
    }

    /// The current task's value, created zeroed when `create` is set.
    /// (The scheduler programs have the task at hand and use `get`.)
    /// `None` when the kernel refuses (out of memory, or a BPF program
    /// already holds this CPU's task-storage lock).
    #[inline(always)]
    #[expect(
        clippy::mut_from_ref,
        reason = "the value lives in the kernel's map, not in self (as aya's map accessors)"
    )]
    #[allow(dead_code, reason = "the scheduler commands' object uses `get` only")]
    pub fn current(&self, create: bool) -> Option<&mut T> {
        // SAFETY: a helper without arguments; it returns the trusted
        // pointer to the current task.
        let task = unsafe { bpf_get_current_task_btf() };
        // SAFETY: as `get` requires.
        unsafe { self.get(task.cast(), create) }
    }

    /// The value of `task`, created zeroed when `create` is set.
    ///
    /// # Safety
    /// `task` must be a pointer the verifier trusts as a `task_struct`: the
    /// current task, or a task argument of a tp_btf/fentry program.
    #[inline(always)]
    #[expect(
        clippy::mut_from_ref,
        reason = "the value lives in the kernel's map, not in self (as aya's map accessors)"
    )]
    pub unsafe fn get(&self, task: *mut core::ffi::c_void, create: bool) -> Option<&mut T> {
        let flags = if create { aya_ebpf::bindings::BPF_LOCAL_STORAGE_GET_F_CREATE as u64 } else { 0 };
        // SAFETY: the helper takes this map and a trusted task pointer; it
        // returns null or a pointer to a value of this map's value type, owned
        // by that task, which outlives this program run.
        unsafe {
            let value =
                bpf_task_storage_get(ptr::from_ref(self).cast_mut().cast(), task.cast(), ptr::null_mut(), flags);
            value.cast::<T>().as_mut()
        }
    }
}
